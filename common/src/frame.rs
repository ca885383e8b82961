//! Framing: one JSON document per line, at most [`MAX_FRAME_BYTES`] long.
//!
//! Newline framing (not a length prefix) lets a reader resynchronise after garbage,
//! an oversized frame or a peer that went away mid-frame, which matters on
//! virtio-serial where one byte stream outlives many host connections. The decoder
//! is sans-I/O; the `io` feature adds an async reader/writer for any tokio stream.

use serde::Serialize;

/// The hard maximum size of one frame, newline excluded.
pub const MAX_FRAME_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of at least {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("cannot encode frame")]
    Encode(#[source] serde_json::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("i/o error on the link")]
    Io(#[from] std::io::Error),
}

/// Serialises a message into one frame, newline included.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = serde_json::to_vec(msg).map_err(FrameError::Encode)?;
    if out.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len: out.len(), max: MAX_FRAME_BYTES });
    }
    out.push(b'\n');
    Ok(out)
}

/// Incremental, bounded line decoder. Feed it bytes, take frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
    /// Inside an oversized frame: drop bytes until the next newline.
    discarding: Option<usize>,
}

/// One decoded item.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Frame(Vec<u8>),
    /// An oversized frame was dropped; `len` is how many bytes it had.
    TooLarge {
        len: usize,
    },
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_BYTES)
    }
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        FrameDecoder { buf: Vec::new(), max, discarding: None }
    }

    /// Bytes buffered of an incomplete frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Consumes `input`, pushing complete items into `out`. Memory stays bounded by
    /// `max`: an oversized frame is counted, not stored.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<Decoded>) {
        while !input.is_empty() {
            let newline = input.iter().position(|&b| b == b'\n');
            let (chunk, rest, complete) = match newline {
                Some(i) => (&input[..i], &input[i + 1..], true),
                None => (input, &[][..], false),
            };
            input = rest;
            if let Some(seen) = self.discarding.as_mut() {
                *seen += chunk.len();
                if complete {
                    out.push(Decoded::TooLarge { len: *seen });
                    self.discarding = None;
                }
                continue;
            }
            if self.buf.len() + chunk.len() > self.max {
                let seen = self.buf.len() + chunk.len();
                self.buf.clear();
                if complete {
                    out.push(Decoded::TooLarge { len: seen });
                } else {
                    self.discarding = Some(seen);
                }
                continue;
            }
            self.buf.extend_from_slice(chunk);
            if complete {
                let frame = std::mem::take(&mut self.buf);
                // Blank lines (keep-alives, a peer's stray newline) are not frames.
                if !frame.iter().all(|b| b.is_ascii_whitespace()) {
                    out.push(Decoded::Frame(frame));
                }
            }
        }
    }

    /// Drops any partial frame (the peer went away; the next one starts fresh).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.discarding = None;
    }
}

#[cfg(feature = "io")]
mod io {
    use std::collections::VecDeque;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::*;

    /// Reads frames from any async byte stream.
    #[derive(Debug)]
    pub struct FrameReader<R> {
        inner: R,
        decoder: FrameDecoder,
        ready: VecDeque<Decoded>,
        scratch: Vec<Decoded>,
        buf: Box<[u8]>,
    }

    impl<R: AsyncRead + Unpin> FrameReader<R> {
        pub fn new(inner: R) -> Self {
            Self::with_limit(inner, MAX_FRAME_BYTES)
        }

        pub fn with_limit(inner: R, max: usize) -> Self {
            FrameReader {
                inner,
                decoder: FrameDecoder::new(max),
                ready: VecDeque::new(),
                scratch: Vec::new(),
                buf: vec![0u8; 16 * 1024].into_boxed_slice(),
            }
        }

        /// The next item; `Err(Closed)` at end of stream.
        pub async fn next(&mut self) -> Result<Decoded, FrameError> {
            loop {
                if let Some(item) = self.ready.pop_front() {
                    return Ok(item);
                }
                let n = self.inner.read(&mut self.buf).await?;
                if n == 0 {
                    return Err(FrameError::Closed);
                }
                self.decoder.feed(&self.buf[..n], &mut self.scratch);
                self.ready.extend(self.scratch.drain(..));
            }
        }

        pub fn get_mut(&mut self) -> &mut R {
            &mut self.inner
        }
    }

    /// Writes one message as a frame and flushes.
    pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
        let bytes = encode(msg)?;
        w.write_all(&bytes).await?;
        w.flush().await?;
        Ok(())
    }
}

#[cfg(feature = "io")]
pub use io::{write_frame, FrameReader};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed_all(dec: &mut FrameDecoder, parts: &[&[u8]]) -> Vec<Decoded> {
        let mut out = Vec::new();
        for p in parts {
            dec.feed(p, &mut out);
        }
        out
    }

    #[test]
    fn splits_lines_across_chunks() {
        let mut dec = FrameDecoder::new(64);
        let out = feed_all(&mut dec, &[b"{\"a\":", b"1}\n{\"b\"", b":2}\n\n  \n"]);
        assert_eq!(out, vec![Decoded::Frame(b"{\"a\":1}".to_vec()), Decoded::Frame(b"{\"b\":2}".to_vec())]);
        assert_eq!(dec.pending(), 0);
    }

    #[test]
    fn oversized_frame_is_dropped_and_stream_resyncs() {
        let mut dec = FrameDecoder::new(8);
        let big = [b'x'; 20];
        let out = feed_all(&mut dec, &[&big[..10], &big[10..], b"\nok\n"]);
        assert_eq!(out, vec![Decoded::TooLarge { len: 20 }, Decoded::Frame(b"ok".to_vec())]);
        // The buffer never grew past the limit.
        assert!(dec.buf.capacity() <= 16);
    }

    #[test]
    fn encode_refuses_oversized_messages() {
        let huge = "x".repeat(MAX_FRAME_BYTES + 1);
        assert!(matches!(encode(&huge), Err(FrameError::TooLarge { .. })));
        assert_eq!(encode(&"hi").expect("small"), b"\"hi\"\n".to_vec());
    }

    proptest! {
        #[test]
        fn decoder_is_chunking_independent(
            data in proptest::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..400),
            split in 0usize..400,
        ) {
            let split = split.min(data.len());
            let mut whole = FrameDecoder::new(32);
            let mut parts = FrameDecoder::new(32);
            prop_assert_eq!(
                feed_all(&mut whole, &[&data]),
                feed_all(&mut parts, &[&data[..split], &data[split..]])
            );
        }
    }
}
