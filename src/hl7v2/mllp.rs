//! MLLP framing (HL7 v2 transport specification: Minimal Lower Layer Protocol release 2, as in HL7 v2.5.1 appendix C.4).
//!
//! A message travels as `0x0B <message bytes> 0x1C 0x0D`; a connection carries any number of
//! frames. This module is pure framing: bytes in, [`Frame`]s out, no I/O and no timers. The
//! connection layer answers every [`Frame::Malformed`] with a NAK and closes a connection that
//! stays inside a frame too long ([`MllpDecoder::is_idle`] tells it whether a frame is pending).
//!
//! Recovery rule: after any framing error the decoder discards bytes until the next start
//! block `0x0B`, because MLLP forbids `0x0B` inside a message, so it is the only safe
//! resynchronisation point. Memory is bounded by `max_len`: an oversize frame is reported as
//! soon as it passes the limit and its remaining bytes are dropped, never buffered.

/// Start block (VT).
pub const START_BLOCK: u8 = 0x0B;
/// End block (FS), followed by [`CARRIAGE_RETURN`].
pub const END_BLOCK: u8 = 0x1C;
/// Last byte of a frame.
pub const CARRIAGE_RETURN: u8 = 0x0D;
/// A default frame limit: PCD-01 observation messages are a few KiB; 1 MiB leaves room for
/// large batches of observations without letting one peer exhaust memory.
pub const DEFAULT_MAX_LEN: usize = 1 << 20;

/// One result of decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The bytes between `0x0B` and `0x1C 0x0D`.
    Message(Vec<u8>),
    /// A framing error; the text says what was wrong (for the NAK and the log).
    Malformed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between frames.
    Idle,
    /// After an error: dropping bytes until the next start block.
    Discarding,
    /// Inside a frame, collecting bytes.
    InFrame,
    /// Saw the end block, expecting the final carriage return.
    AfterEnd,
}

/// Incremental MLLP decoder: feed it whatever the socket read returns.
#[derive(Debug, Clone)]
pub struct MllpDecoder {
    /// Largest message accepted, in bytes (framing bytes excluded); bounds memory per connection.
    max_len: usize,
    state: State,
    /// The message collected so far; never longer than `max_len`.
    buf: Vec<u8>,
}

impl Default for MllpDecoder {
    fn default() -> Self {
        MllpDecoder::new(DEFAULT_MAX_LEN)
    }
}

impl MllpDecoder {
    pub fn new(max_len: usize) -> Self {
        MllpDecoder {
            max_len,
            state: State::Idle,
            buf: Vec::new(),
        }
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// True when no frame is partly received, so closing the connection loses nothing.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle | State::Discarding)
    }

    /// Bytes of the partly received frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Call at end of stream: a frame cut off by the peer is reported, then the decoder is reset.
    pub fn finish(&mut self) -> Option<Frame> {
        let cut = !self.is_idle();
        self.state = State::Idle;
        self.buf = Vec::new();
        cut.then(|| Frame::Malformed("connection closed inside a frame".into()))
    }

    /// Consumes `bytes` and returns the frames completed by them, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        for &b in bytes {
            match self.state {
                State::Idle => match b {
                    START_BLOCK => self.start(),
                    // Some senders put a newline after `0x1C 0x0D`; whitespace between frames
                    // carries nothing, and a NAK for it would only confuse the sender.
                    b if b.is_ascii_whitespace() => {}
                    b => {
                        out.push(Frame::Malformed(format!(
                            "byte 0x{b:02X} outside a frame; discarding until the next start block"
                        )));
                        self.state = State::Discarding;
                    }
                },
                State::Discarding => {
                    if b == START_BLOCK {
                        self.start();
                    }
                }
                State::InFrame => match b {
                    START_BLOCK => {
                        // The previous frame never ended; the new start block begins a new one.
                        out.push(Frame::Malformed(
                            "start block inside a frame (end block missing)".into(),
                        ));
                        self.start();
                    }
                    END_BLOCK => self.state = State::AfterEnd,
                    b => {
                        if self.buf.len() >= self.max_len {
                            out.push(Frame::Malformed(format!(
                                "frame longer than {} bytes",
                                self.max_len
                            )));
                            self.buf = Vec::new();
                            self.state = State::Discarding;
                        } else {
                            self.buf.push(b);
                        }
                    }
                },
                State::AfterEnd => match b {
                    CARRIAGE_RETURN => {
                        let msg = std::mem::take(&mut self.buf);
                        self.state = State::Idle;
                        out.push(if msg.is_empty() {
                            Frame::Malformed("empty frame".into())
                        } else {
                            Frame::Message(msg)
                        });
                    }
                    START_BLOCK => {
                        out.push(Frame::Malformed(
                            "end block not followed by carriage return".into(),
                        ));
                        self.start();
                    }
                    _ => {
                        out.push(Frame::Malformed(
                            "end block not followed by carriage return".into(),
                        ));
                        self.buf = Vec::new();
                        self.state = State::Discarding;
                    }
                },
            }
        }
        out
    }

    fn start(&mut self) {
        self.buf = Vec::new();
        self.state = State::InFrame;
    }
}

/// Wraps a message (or an ACK) for sending: `0x0B msg 0x1C 0x0D`.
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 3);
    out.push(START_BLOCK);
    out.extend_from_slice(msg);
    out.push(END_BLOCK);
    out.push(CARRIAGE_RETURN);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    fn is_malformed(f: &Frame) -> bool {
        matches!(f, Frame::Malformed(_))
    }

    #[test]
    fn frame_split_across_pushes() {
        let wire = frame(b"MSH|a\rPID|1\r");
        for cut in 0..=wire.len() {
            let mut d = MllpDecoder::new(100);
            let mut got = d.push(&wire[..cut]);
            assert_eq!(d.is_idle(), cut == 0 || cut == wire.len());
            got.extend(d.push(&wire[cut..]));
            assert_eq!(got, vec![msg("MSH|a\rPID|1\r")], "cut at {cut}");
            assert!(d.is_idle());
        }
    }

    #[test]
    fn two_frames_in_one_push_and_whitespace_between() {
        let mut d = MllpDecoder::new(100);
        let wire = [frame(b"one"), b"\r\n".to_vec(), frame(b"two")].concat();
        assert_eq!(d.push(&wire), vec![msg("one"), msg("two")]);
    }

    #[test]
    fn garbage_between_frames_is_reported_once_then_resynchronised() {
        let mut d = MllpDecoder::new(100);
        let wire = [frame(b"one"), b"GARBAGE\x1C\x0D".to_vec(), frame(b"two")].concat();
        let got = d.push(&wire);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], msg("one"));
        assert!(is_malformed(&got[1]));
        assert_eq!(got[2], msg("two"));
    }

    #[test]
    fn oversize_frame_is_rejected_without_buffering() {
        let mut d = MllpDecoder::new(10);
        let wire = [frame(&[b'x'; 50]), frame(b"small")].concat();
        let got = d.push(&wire);
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[0], Frame::Malformed(r) if r.contains("longer than 10")));
        assert_eq!(got[1], msg("small"));
        // Exactly max_len is fine.
        assert_eq!(
            d.push(&frame(&[b'y'; 10])),
            vec![Frame::Message(vec![b'y'; 10])]
        );
    }

    #[test]
    fn broken_frames() {
        let mut d = MllpDecoder::new(100);
        // New start block before the end of the previous frame: report, keep the new frame.
        let got = d.push(b"\x0Bhalf\x0Bwhole\x1C\x0D");
        assert_eq!(got.len(), 2);
        assert!(is_malformed(&got[0]));
        assert_eq!(got[1], msg("whole"));
        // End block followed by something other than CR.
        let got = d.push(b"\x0Bbad\x1Cx\x0D\x0Bok\x1C\x0D");
        assert!(is_malformed(&got[0]));
        assert_eq!(got[1], msg("ok"));
        // Empty frame.
        assert!(is_malformed(&d.push(b"\x0B\x1C\x0D")[0]));
        // Connection closed mid-frame.
        assert!(d.push(b"\x0Bpartial").is_empty());
        assert_eq!(d.pending(), 7);
        assert!(d.finish().is_some_and(|f| is_malformed(&f)));
        assert!(d.finish().is_none());
    }
}
