//! What processing a frame returns: everything the caller needs to act on it.
//!
//! The engine decides; the caller sends. For every frame it processes, the
//! engine records a [`Processed`] in a caller-owned [`Results`]: the
//! [`Disposition`] (forward, or drop with a typed [`DropReason`]), the
//! [`Output`]s (each a port and, towards another host, its VXLAN-GBP
//! [`Encap`]), and for a frame the policy rejects the [`Reply`] that tells
//! its sender. Turning those into bytes is for [`crate::render()`] and its siblings, over this
//! value and the frame alone: nothing refers back to the engine, so the
//! caller may process the next batch while it still sends this one's
//! outputs, and a [`Processed`] always carries the frame it describes.
//!
//! A [`Results`] is reused across frames and batches: entries, outputs and
//! replies are kept in three vectors that are cleared, never freed, so after
//! the first batches processing allocates nothing for them (after OPTE's
//! `ProcessResult`, and VPP's per-frame `next` arrays).

use core::net::Ipv4Addr;

use palisade_wire::ethernet::{EtherType, EthernetAddress};
use palisade_wire::flow::{FlowKey, Segment};
use palisade_wire::virtio_net::Offload;

use crate::port::{PortId, UplinkConfig};
use crate::tcptrack::TcpSeg;
use crate::verdict::{DropReason, InspectProfile};

/// What to do with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Send it to its [`Processed::outputs`].
    Forward,
    /// Drop it; with [`DropReason::PolicyReject`], send its [`Processed::reply`].
    Drop(DropReason),
}

/// VXLAN-GBP encapsulation towards another host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encap {
    /// The remote tunnel endpoint.
    pub remote: Ipv4Addr,
    /// The VNI.
    pub vni: u32,
    /// The source's group id.
    pub group_id: u16,
    /// Whether policy was applied here (the receiver must not evaluate again).
    pub policy_applied: bool,
    /// The outer UDP source port (RFC 7348: from the ephemeral range, the
    /// same for both directions of a flow: entropy for the underlay's ECMP).
    pub source_port: u16,
}

/// One copy of a frame to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    /// The port.
    pub port: PortId,
    /// Encapsulation (uplink outputs to another host).
    pub encap: Option<Encap>,
}

/// Where the (inner) Ethernet frame of a packet lies in what arrived, and
/// how it was switched.
#[derive(Debug, Clone, Copy)]
pub(crate) struct L2 {
    /// Offset of the destination MAC.
    pub eth: usize,
    /// Offset of the payload after any tags.
    pub payload: usize,
    pub ethertype: EtherType,
    pub src: EthernetAddress,
    pub dst: EthernetAddress,
    pub segment: Segment,
}

impl Default for L2 {
    fn default() -> Self {
        L2 {
            eth: 0,
            payload: 0,
            ethertype: EtherType(0),
            src: EthernetAddress([0; 6]),
            dst: EthernetAddress([0; 6]),
            segment: Segment::UNTAGGED,
        }
    }
}

/// Where a decided frame's (inner) Ethernet frame lies and how it was
/// switched: what rendering needs of [`L2`], in a few bytes, as every
/// frame's entry in [`Results`] carries it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    /// Offset of the destination MAC (the source MAC follows it).
    pub eth: u16,
    /// Offset of the payload after any tags.
    pub payload: u16,
    pub ethertype: EtherType,
    pub segment: Segment,
}

impl Layout {
    /// Header offsets are within the first few hundred bytes of a frame
    /// (outer headers, a VXLAN header, two tags); one that is not cannot
    /// have been parsed, and saturates, so rendering finds no such bytes.
    pub fn of(l2: &L2) -> Layout {
        Layout {
            eth: u16::try_from(l2.eth).unwrap_or(u16::MAX),
            payload: u16::try_from(l2.payload).unwrap_or(u16::MAX),
            ethertype: l2.ethertype,
            segment: l2.segment,
        }
    }

    /// Offset of the destination MAC.
    pub fn eth(&self) -> usize {
        usize::from(self.eth)
    }

    /// Offset of the payload after any tags.
    pub fn payload(&self) -> usize {
        usize::from(self.payload)
    }
}

/// The host's side of the underlay, which an encapsulated copy is sent from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Underlay {
    pub local_mac: EthernetAddress,
    pub local_ip: Ipv4Addr,
    pub gateway_mac: EthernetAddress,
}

impl Default for Underlay {
    fn default() -> Self {
        Underlay {
            local_mac: EthernetAddress([0; 6]),
            local_ip: Ipv4Addr::UNSPECIFIED,
            gateway_mac: EthernetAddress([0; 6]),
        }
    }
}

impl Underlay {
    pub fn of(uplink: &UplinkConfig) -> Self {
        Underlay {
            local_mac: uplink.local_mac,
            local_ip: uplink.local_ip,
            gateway_mac: uplink.gateway_mac,
        }
    }
}

/// What a rejected packet's reply is built from: the packet's flow key,
/// where its IP header and payload start in the inner frame, and its TCP
/// facts (a TCP packet is answered with a reset).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplySpec {
    pub key: FlowKey,
    pub l3_offset: usize,
    pub l4_offset: usize,
    pub tcp: Option<TcpSeg>,
}

/// One frame's entry in [`Results`]: half a cache line, written for every
/// frame of a batch while its flows' cache lines are being prefetched.
#[derive(Debug, Clone, Copy)]
struct Entry {
    disposition: Disposition,
    layout: Layout,
    /// The frame's length: a frame handed back with the entry must be as long.
    frame_len: u32,
    /// `Results::outputs[outputs.0..outputs.1]`.
    outputs: (u32, u32),
    /// An index into `Results::replies`, or [`NO_REPLY`].
    reply: u32,
    /// The flow's inspection profile (forwarded frames only).
    inspect: Option<InspectProfile>,
}

/// `Entry::reply` of a frame without a reply.
const NO_REPLY: u32 = u32::MAX;

/// A frame's length as an entry holds it (frames are at most 64 KiB and a
/// bit; a longer one saturates and is then never matched by a frame).
fn entry_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// The engine's decisions for the frames of one call, in a caller-owned
/// arena reused across calls ([`crate::Engine::process`],
/// [`crate::Engine::process_overlay`], [`crate::Engine::process_batch`]):
/// each call clears it, then records one entry per frame, in order.
#[derive(Debug, Default)]
pub struct Results {
    entries: Vec<Entry>,
    outputs: Vec<Output>,
    replies: Vec<ReplySpec>,
    /// Each entry's offload state, by index, filled only as far as the
    /// last frame that had one: the entry stays half a cache line and a
    /// call with plain frames only writes nothing here.
    offloads: Vec<Offload>,
    underlay: Underlay,
}

impl Results {
    /// An empty arena.
    pub fn new() -> Self {
        Self::default()
    }

    /// An arena with room for `frames` frames' decisions (and as many
    /// outputs) before it grows: a caller that processes batches of at most
    /// `frames` then never allocates for it.
    pub fn with_capacity(frames: usize) -> Self {
        Results {
            entries: Vec::with_capacity(frames),
            outputs: Vec::with_capacity(frames),
            replies: Vec::new(),
            offloads: Vec::with_capacity(frames),
            underlay: Underlay::default(),
        }
    }

    /// Forget every entry (keeping the memory).
    #[inline]
    pub fn clear(&mut self) {
        self.entries.clear();
        self.outputs.clear();
        self.replies.clear();
        self.offloads.clear();
    }

    /// Frames recorded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no frame is recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The disposition of frame `index`.
    pub fn disposition(&self, index: usize) -> Option<Disposition> {
        self.entries.get(index).map(|e| e.disposition)
    }

    /// The decision for frame `index`, paired with that frame. `None` when
    /// there is no such entry, or `frame` is not as long as the frame that
    /// was processed (it cannot be that frame).
    pub fn get<'a>(&'a self, index: usize, frame: &'a [u8]) -> Option<Processed<'a>> {
        let e = self.entries.get(index)?;
        if e.frame_len != entry_len(frame.len()) {
            return None;
        }
        Some(self.view(index, e, frame))
    }

    /// The decisions of a batch, each paired with its frame (`frames` are the
    /// batch's frames, in the order they were processed; entries without a
    /// matching frame are skipped).
    pub fn iter<'a, F: AsRef<[u8]>>(&'a self, frames: &'a [F]) -> impl Iterator<Item = Processed<'a>> + 'a {
        self.entries
            .iter()
            .enumerate()
            .zip(frames)
            .filter(|((_, e), f)| e.frame_len == entry_len(f.as_ref().len()))
            .map(|((i, e), f)| self.view(i, e, f.as_ref()))
    }

    /// Entry `index` (`e`), paired with `frame`.
    #[inline]
    fn view<'a>(&'a self, index: usize, e: &Entry, frame: &'a [u8]) -> Processed<'a> {
        let outputs = self
            .outputs
            .get(e.outputs.0 as usize..e.outputs.1 as usize)
            .unwrap_or(&[]);
        Processed {
            disposition: e.disposition,
            outputs,
            frame,
            layout: e.layout,
            underlay: self.underlay,
            reply: self.replies.get(e.reply as usize).copied(),
            offload: self.offloads.get(index).copied().unwrap_or(Offload::NONE),
            inspect: e.inspect,
        }
    }

    /// The last entry, paired with its frame (`process` and `process_overlay` record one).
    #[inline]
    pub(crate) fn last<'a>(&'a self, frame: &'a [u8]) -> Processed<'a> {
        match self.entries.last() {
            Some(e) => self.view(self.entries.len() - 1, e, frame),
            // Every processing call records its frame before returning.
            None => Processed {
                disposition: Disposition::Drop(DropReason::Malformed),
                outputs: &[],
                frame,
                layout: Layout::of(&L2::default()),
                underlay: self.underlay,
                reply: None,
                offload: Offload::NONE,
                inspect: None,
            },
        }
    }

    /// Start a call: clear, and note the underlay encapsulated copies are sent from.
    #[inline]
    pub(crate) fn begin(&mut self, underlay: Underlay) {
        self.clear();
        self.underlay = underlay;
    }

    /// Where the next frame's outputs start.
    #[inline]
    pub(crate) fn outputs_start(&self) -> u32 {
        self.outputs.len() as u32
    }

    /// Stage an output of the frame being processed.
    #[inline]
    pub(crate) fn push_output(&mut self, out: Output) {
        self.outputs.push(out);
    }

    /// Take back the outputs staged since `start` (the frame was dropped after all).
    #[inline]
    pub(crate) fn discard_outputs(&mut self, start: u32) {
        self.outputs.truncate(start as usize);
    }

    /// Outputs staged since `start`.
    #[inline]
    pub(crate) fn outputs_since(&self, start: u32) -> usize {
        self.outputs.len() - start as usize
    }

    /// Record a frame's decision (its outputs are those staged since `start`).
    // One call per frame, from one place: the fields of the entry it writes.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(crate) fn record(
        &mut self,
        disposition: Disposition,
        l2: L2,
        frame_len: usize,
        offload: Offload,
        start: u32,
        reply: Option<ReplySpec>,
        inspect: Option<InspectProfile>,
    ) {
        let reply = match reply {
            Some(r) => {
                self.replies.push(r);
                (self.replies.len() - 1) as u32
            }
            None => NO_REPLY,
        };
        if offload != Offload::NONE {
            self.offloads.resize(self.entries.len(), Offload::NONE);
            self.offloads.push(offload);
        }
        self.entries.push(Entry {
            disposition,
            layout: Layout::of(&l2),
            frame_len: entry_len(frame_len),
            outputs: (start, self.outputs.len() as u32),
            reply,
            inspect,
        });
    }
}

/// The engine's decision for one frame, with the frame: what
/// [`crate::render()`] and its siblings turn into the frames to send.
#[derive(Debug, Clone, Copy)]
pub struct Processed<'a> {
    /// Forward or drop.
    pub disposition: Disposition,
    /// Where copies go (empty unless forwarded).
    pub outputs: &'a [Output],
    pub(crate) frame: &'a [u8],
    pub(crate) layout: Layout,
    pub(crate) underlay: Underlay,
    pub(crate) reply: Option<ReplySpec>,
    pub(crate) offload: Offload,
    pub(crate) inspect: Option<InspectProfile>,
}

impl<'a> Processed<'a> {
    /// The frame this decision is about.
    pub fn frame(&self) -> &'a [u8] {
        self.frame
    }

    /// The frame's offload state as it arrived ([`Offload::NONE`] for a
    /// plain frame). A copy as rendered has its own:
    /// [`crate::render_offload`], [`crate::render_overlay_offload`].
    pub fn offload(&self) -> Offload {
        self.offload
    }

    /// What to tell the sender of a rejected frame ([`DropReason::PolicyReject`]).
    pub fn reply(&self) -> Option<Reply<'a>> {
        Some(Reply {
            frame: self.frame,
            layout: self.layout,
            spec: self.reply?,
        })
    }

    /// The inspection profile of a forwarded frame's flow (`None`: the flow
    /// is not inspected, or the frame was dropped). Its name:
    /// [`crate::Engine::inspection_profile_name`].
    #[inline]
    pub fn inspection(&self) -> Option<InspectProfile> {
        self.inspect
    }

    /// The (inner) Ethernet frame: past the outer headers of a frame that
    /// came encapsulated, what the VM sent.
    pub fn inner_frame(&self) -> &'a [u8] {
        self.frame.get(self.layout.eth()..).unwrap_or(&[])
    }

    /// The reply that rejects this frame, as [`Processed::reply`] gives one
    /// for a frame the policy rejects: for inline inspection's `reject` of a
    /// forwarded frame. `None` when the frame is not IP.
    pub fn reject_reply(&self) -> Option<Reply<'a>> {
        let inner = self.inner_frame();
        let info = palisade_wire::flow::extract(inner).ok().flatten()?;
        if info.key.src_addr().is_ipv4() != info.key.dst_addr().is_ipv4() {
            return None;
        }
        let tcp = if info.key.protocol == palisade_wire::ip::IpProtocol::TCP {
            crate::engine::tcp_seg(inner, &info)
        } else {
            None
        };
        Some(Reply {
            frame: self.frame,
            layout: self.layout,
            spec: ReplySpec {
                key: info.key,
                l3_offset: usize::from(info.l3_offset),
                l4_offset: usize::from(info.l4_offset),
                tcp,
            },
        })
    }
}

impl PartialEq<Disposition> for Processed<'_> {
    fn eq(&self, other: &Disposition) -> bool {
        self.disposition == *other
    }
}

/// The answer to a rejected frame: a TCP reset for TCP, otherwise ICMP
/// "administratively prohibited". It goes back out the port the frame came
/// in on; [`crate::render_reply`] writes it.
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    pub(crate) frame: &'a [u8],
    pub(crate) layout: Layout,
    pub(crate) spec: ReplySpec,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_half_a_cache_line() {
        assert!(core::mem::size_of::<Entry>() <= 32, "{}", core::mem::size_of::<Entry>());
    }
}
