//! A synthetic ruleset shaped like a commercial one, from a fixed seed.
//!
//! Shared by the inspect benchmark and the prefilter shootout
//! (`bench/prefilter`), so both measure the same patterns. Of `n` rules:
//! 60% TCP payload rules (one or two contents, some `nocase`, some with a
//! `distance`), 25% HTTP rules on `http.uri` or `http.user_agent`, 10% DNS
//! query rules, 5% rules whose fast pattern is a token common in real
//! traffic (`User-Agent`, `.php`, …) followed by a random one, so that
//! candidates reach full evaluation as they do with real rulesets.
//! Classtypes are drawn so that about 15% of rules are priority 1 (the
//! `critical` profile), 35% priority 2 and the rest priority 3.

#![allow(dead_code)]

/// xorshift64*: deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./=";

/// A random word of `min..=max` bytes from a rule-friendly alphabet.
pub fn word(rng: &mut Rng, min: u64, max: u64) -> String {
    let len = min + rng.below(max - min + 1);
    (0..len)
        .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize] as char)
        .collect()
}

const COMMON: &[&str] = &[
    "User-Agent",
    "Content-Type",
    ".php",
    "Host: ",
    "HTTP/1.1",
    "Accept-Encoding",
    "Mozilla/5.0",
    "text/html",
    "Connection: ",
    "Cookie",
    "/index",
    ".js",
    "charset=",
    "GET /",
    "POST /",
    "application/",
];

const CLASSES: &[(&str, u32)] = &[
    ("trojan-activity", 10),         // 1
    ("attempted-admin", 5),          // 1
    ("bad-unknown", 20),             // 2
    ("attempted-recon", 10),         // 2
    ("web-application-activity", 5), // 2
    ("misc-activity", 30),           // 3
    ("policy-violation", 0),         // 1 (unused weight keeps the table honest)
    ("not-suspicious", 20),          // 3
];

fn classtype(rng: &mut Rng) -> &'static str {
    let total: u32 = CLASSES.iter().map(|c| c.1).sum();
    let mut r = rng.below(u64::from(total)) as u32;
    for (c, w) in CLASSES {
        if r < *w {
            return c;
        }
        r -= w;
    }
    "misc-activity"
}

/// `n` rules, sids from 1_000_000, deterministic for a given `seed`.
pub fn ruleset(n: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut out = String::with_capacity(n * 160);
    for i in 0..n {
        let sid = 1_000_000 + i;
        let class = classtype(&mut rng);
        let kind = rng.below(100);
        let nocase = if rng.below(4) == 0 { " nocase;" } else { "" };
        let line = if kind < 60 {
            let a = word(&mut rng, 6, 18);
            if rng.below(3) == 0 {
                let b = word(&mut rng, 4, 10);
                format!(
                    "alert tcp $HOME_NET any -> $EXTERNAL_NET any (msg:\"synthetic tcp {sid}\"; flow:established,to_server; content:\"{a}\";{nocase} content:\"{b}\"; distance:0; classtype:{class}; sid:{sid}; rev:1;)\n"
                )
            } else {
                format!(
                    "alert tcp any any -> any any (msg:\"synthetic tcp {sid}\"; content:\"{a}\";{nocase} classtype:{class}; sid:{sid}; rev:1;)\n"
                )
            }
        } else if kind < 85 {
            let a = word(&mut rng, 6, 18);
            if rng.below(2) == 0 {
                format!(
                    "alert http $HOME_NET any -> $EXTERNAL_NET any (msg:\"synthetic uri {sid}\"; flow:established,to_server; http.uri; content:\"/{a}\";{nocase} classtype:{class}; sid:{sid}; rev:1;)\n"
                )
            } else {
                format!(
                    "alert http any any -> any any (msg:\"synthetic ua {sid}\"; http.user_agent; content:\"{a}\"; nocase; classtype:{class}; sid:{sid}; rev:1;)\n"
                )
            }
        } else if kind < 95 {
            let a = word(&mut rng, 5, 12).replace(['/', '='], "x");
            format!(
                "alert dns any any -> any any (msg:\"synthetic dns {sid}\"; dns.query; content:\"{a}.com\"; nocase; classtype:{class}; sid:{sid}; rev:1;)\n"
            )
        } else {
            let common = COMMON[rng.below(COMMON.len() as u64) as usize];
            let b = word(&mut rng, 6, 12);
            format!(
                "alert tcp any any -> any any (msg:\"synthetic common {sid}\"; content:\"{common}\"; fast_pattern; content:\"{b}\"; distance:0; classtype:{class}; sid:{sid}; rev:1;)\n"
            )
        };
        out.push_str(&line);
    }
    out
}

/// Every content pattern of [`ruleset`]'s output (for the prefilter shootout).
pub fn patterns(n: usize, seed: u64) -> Vec<Vec<u8>> {
    ruleset(n, seed)
        .lines()
        .filter_map(|l| {
            // The fast pattern: the first content, or the one marked fast_pattern.
            let start = l.find("content:\"")? + 9;
            let end = start + l[start..].find('"')?;
            Some(l.as_bytes()[start..end].to_vec())
        })
        .collect()
}
