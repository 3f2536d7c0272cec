//! Length-prefixed framing with hard limits.

use std::io::{self, Read, Write};

use crate::kind::{Kind, MAX_CONTROL_PAYLOAD, MAX_DATA_PAYLOAD, PROC_ID_LEN};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("channel i/o failed")]
    Io(#[from] io::Error),
    #[error("peer closed the channel")]
    Closed,
    #[error("peer closed the channel in the middle of a frame")]
    Truncated,
    #[error("frame of length 0 (a frame carries at least its kind byte)")]
    Empty,
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("frame of kind {kind:?} announces {len} payload bytes, over the limit of {limit}")]
    TooLarge {
        kind: Kind,
        len: usize,
        limit: usize,
    },
    #[error("frame of kind {kind:?} carries a malformed payload")]
    BadPayload {
        kind: Kind,
        #[source]
        source: serde_json::Error,
    },
    #[error("frame of kind {kind:?} is refused: {problem}")]
    Invalid { kind: Kind, problem: String },
    #[error("frame of kind {0:?} does not start with a 4-byte process id")]
    NoProcId(Kind),
    #[error("frame of kind {0:?} is not allowed in this direction")]
    WrongDirection(Kind),
}

/// One frame as read off the wire, before decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

/// Reads frames from a byte stream, refusing anything over the limits.
pub struct FrameReader<R> {
    inner: R,
    /// `Run` and `ContainerAdd` frames may be as large as their volumes make them
    /// ([`crate::MAX_RUN_PAYLOAD`]); otherwise they are held to [`MAX_CONTROL_PAYLOAD`],
    /// so the host, which never reads them, allocates no more for them than for any
    /// control frame.
    large_runs: bool,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            large_runs: false,
        }
    }

    /// The agent's reader: it takes `Run` and `ContainerAdd` frames up to their own limit.
    pub fn taking_runs(mut self) -> Self {
        self.large_runs = true;
        self
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads the next frame. Returns [`FrameError::Closed`] on a clean end of
    /// stream between frames.
    pub fn read_frame(&mut self) -> Result<RawFrame, FrameError> {
        let mut header = [0u8; 5];
        let got = read_full(&mut self.inner, &mut header)?;
        if got == 0 {
            return Err(FrameError::Closed);
        }
        if got < header.len() {
            return Err(FrameError::Truncated);
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        let kind = Kind::from_byte(header[4]).ok_or(FrameError::UnknownKind(header[4]))?;
        let payload_len = len - 1;
        let limit = match kind {
            Kind::Run | Kind::ContainerAdd if !self.large_runs => MAX_CONTROL_PAYLOAD,
            _ => kind.payload_limit(),
        };
        if payload_len > limit {
            return Err(FrameError::TooLarge {
                kind,
                len: payload_len,
                limit,
            });
        }
        let mut payload = vec![0u8; payload_len];
        if read_full(&mut self.inner, &mut payload)? < payload_len {
            return Err(FrameError::Truncated);
        }
        Ok(RawFrame { kind, payload })
    }
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, io::Error> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes frames to a byte stream.
pub struct FrameWriter<W> {
    inner: W,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Writes one frame. Payloads over the kind's limit are refused, so a
    /// correct writer can never produce a frame the reader rejects; data
    /// callers split with [`FrameWriter::write_data`].
    pub fn write_frame(&mut self, kind: Kind, payload: &[u8]) -> Result<(), FrameError> {
        let limit = kind.payload_limit();
        if payload.len() > limit {
            return Err(FrameError::TooLarge {
                kind,
                len: payload.len(),
                limit,
            });
        }
        let len = u32::try_from(payload.len() + 1).map_err(|_| FrameError::TooLarge {
            kind,
            len: payload.len(),
            limit,
        })?;
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.extend_from_slice(&len.to_be_bytes());
        buf.push(kind as u8);
        buf.extend_from_slice(payload);
        self.inner.write_all(&buf)?;
        self.inner.flush()?;
        Ok(())
    }

    /// Writes a data stream in chunks of at most [`MAX_DATA_PAYLOAD`].
    pub fn write_data(&mut self, kind: Kind, data: &[u8]) -> Result<(), FrameError> {
        for chunk in data.chunks(MAX_DATA_PAYLOAD) {
            self.write_frame(kind, chunk)?;
        }
        Ok(())
    }

    /// Writes the data stream of process `id` in chunks of at most [`MAX_DATA_PAYLOAD`]
    /// bytes, each after the id (4 bytes, big-endian).
    pub fn write_proc_data(&mut self, kind: Kind, id: u32, data: &[u8]) -> Result<(), FrameError> {
        let mut buf = Vec::with_capacity(PROC_ID_LEN + data.len().min(MAX_DATA_PAYLOAD));
        for chunk in data.chunks(MAX_DATA_PAYLOAD) {
            buf.clear();
            buf.extend_from_slice(&id.to_be_bytes());
            buf.extend_from_slice(chunk);
            self.write_frame(kind, &buf)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        // Announces 4 GiB of stdout: must fail on the header alone.
        let mut buf = u32::MAX.to_be_bytes().to_vec();
        buf.push(Kind::Stdout as u8);
        let err = FrameReader::new(&buf[..]).read_frame().unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    kind: Kind::Stdout,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn writer_refuses_oversized_control_payload() {
        let mut buf = Vec::new();
        let mut w = FrameWriter::new(&mut buf);
        let err = w
            .write_frame(Kind::Log, &vec![b'a'; MAX_CONTROL_PAYLOAD + 1])
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert!(buf.is_empty());
    }

    #[test]
    fn only_the_agents_reader_takes_a_large_run() {
        let payload = vec![b' '; MAX_CONTROL_PAYLOAD + 1];
        let mut buf = Vec::new();
        FrameWriter::new(&mut buf)
            .write_frame(Kind::Run, &payload)
            .unwrap();
        let err = FrameReader::new(&buf[..]).read_frame().unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { kind: Kind::Run, limit, .. } if limit == MAX_CONTROL_PAYLOAD),
            "{err}"
        );
        let got = FrameReader::new(&buf[..])
            .taking_runs()
            .read_frame()
            .unwrap();
        assert_eq!(got.payload.len(), payload.len());
    }
}
