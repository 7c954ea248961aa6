//! The property the `transfer_decode` fuzz target checks, shared with the
//! test that replays its inputs (`tests/transfer_fuzz.rs`).

use palisade_datapath::transfer;

/// Any bytes through the agent-to-agent transfer decoder: never a panic;
/// what it accepts holds no more items than its bytes can carry, and
/// encodes again to bytes that decode to the same transfer.
pub fn check_transfer(data: &[u8]) -> Result<(), String> {
    let Ok(t) = transfer::decode(data) else {
        return Ok(());
    };
    // A key takes at least 8 bytes, a record 13.
    if t.conns.len() * 13 + t.removed.len() * 8 > data.len() {
        return Err(format!(
            "{} records and {} removed keys from {} bytes",
            t.conns.len(),
            t.removed.len(),
            data.len()
        ));
    }
    let again = transfer::encode(&t);
    let back = transfer::decode(&again).map_err(|e| format!("the re-encoded transfer is refused: {e}"))?;
    if back != t {
        return Err("the re-encoded transfer decodes differently".into());
    }
    Ok(())
}
