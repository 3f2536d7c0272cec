//! A sandbox's output on disk: one JSON object a line ([`LogLine`]) in `log`, rotated
//! to `log.1` when it passes its size limit, so a sandbox keeps at most twice the limit.
//! The supervisor writes ([`LogFile`], [`StreamWriter`]); the daemon reads ([`tail`],
//! [`read_from`]).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gpucell_api::LogLine;

/// Default size at which `log` is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 20;
/// A line longer than this is cut into pieces.
const MAX_LINE: usize = 16 * 1024;

pub const LOG: &str = "log";
pub const LOG_OLD: &str = "log.1";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot open the log file {path:?}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the log file {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The writing end: appends lines, rotates by size.
pub struct LogFile {
    dir: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
}

impl LogFile {
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, LogError> {
        let path = dir.join(LOG);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| LogError::Open {
                path: path.clone(),
                source,
            })?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(LogFile {
            dir: dir.to_path_buf(),
            file,
            size,
            max_bytes: max_bytes.max(1024),
        })
    }

    /// Appends one line; rotates first when the file is full. Errors are logged, never
    /// passed to the workload's output path.
    pub fn write_line(&mut self, stream: &str, line: &str) {
        let entry = LogLine {
            t_ms: now_ms(),
            stream: stream.to_string(),
            line: line.to_string(),
        };
        let Ok(mut text) = serde_json::to_string(&entry) else {
            return;
        };
        text.push('\n');
        if self.size + text.len() as u64 > self.max_bytes && self.size > 0 {
            if let Err(e) = self.rotate() {
                tracing::warn!("rotating the log in {}: {e}", self.dir.display());
            }
        }
        match self.file.write_all(text.as_bytes()) {
            Ok(()) => self.size += text.len() as u64,
            Err(e) => tracing::warn!("writing the log in {}: {e}", self.dir.display()),
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(self.dir.join(LOG), self.dir.join(LOG_OLD))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(LOG))?;
        self.size = 0;
        Ok(())
    }
}

/// One stream (stdout or stderr) of the workload, cut into lines for a shared
/// [`LogFile`]. A last unterminated line is written when the writer is dropped.
pub struct StreamWriter {
    log: Arc<Mutex<LogFile>>,
    stream: &'static str,
    pending: Vec<u8>,
}

impl StreamWriter {
    pub fn new(log: Arc<Mutex<LogFile>>, stream: &'static str) -> Self {
        StreamWriter {
            log,
            stream,
            pending: Vec::new(),
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        if let Ok(mut log) = self.log.lock() {
            log.write_line(self.stream, text);
        }
    }
}

impl Write for StreamWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(nl) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).collect();
            self.emit(&line);
        }
        while self.pending.len() > MAX_LINE {
            let piece: Vec<u8> = self.pending.drain(..MAX_LINE).collect();
            self.emit(&piece);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.emit(&rest);
        }
    }
}

/// Parses complete lines of `text`; garbled lines are skipped.
fn parse_lines(text: &[u8], out: &mut Vec<LogLine>) {
    for line in text.split(|b| *b == b'\n') {
        if let Ok(l) = serde_json::from_slice::<LogLine>(line) {
            out.push(l);
        }
    }
}

fn read_all(path: &Path) -> Result<Vec<u8>, LogError> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(LogError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The last `n` lines (all with `None`) of `log.1` and `log`, and the length of `log`
/// read, from where a follower goes on.
pub fn tail(dir: &Path, n: Option<usize>) -> Result<(Vec<LogLine>, u64), LogError> {
    let mut lines = Vec::new();
    parse_lines(&read_all(&dir.join(LOG_OLD))?, &mut lines);
    let current = read_all(&dir.join(LOG))?;
    // Only complete lines count: the writer may be half-way through one.
    let complete = current
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    parse_lines(&current[..complete], &mut lines);
    if let Some(n) = n {
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    Ok((lines, complete as u64))
}

/// Complete lines of `log` from `offset`, and the new offset. A file shorter than
/// `offset` was rotated: reading starts again at its beginning.
pub fn read_from(dir: &Path, offset: u64) -> Result<(Vec<LogLine>, u64), LogError> {
    let path = dir.join(LOG);
    let read_err = |source| LogError::Read {
        path: path.clone(),
        source,
    };
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(read_err(e)),
    };
    let len = file.metadata().map_err(read_err)?.len();
    let start = if len < offset { 0 } else { offset };
    file.seek(SeekFrom::Start(start)).map_err(read_err)?;
    let mut reader = BufReader::new(file.take(len - start));
    let mut lines = Vec::new();
    let mut pos = start;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(read_err)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            break;
        }
        pos += n as u64;
        parse_lines(&buf, &mut lines);
    }
    Ok((lines, pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_rotated_and_tailed() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Mutex::new(LogFile::open(dir.path(), 2048).unwrap()));
        {
            let mut out = StreamWriter::new(log.clone(), "stdout");
            let mut err = StreamWriter::new(log.clone(), "stderr");
            out.write_all(b"one\ntw").unwrap();
            err.write_all(b"e1\n").unwrap();
            out.write_all(b"o\nthree").unwrap();
        }
        let (lines, off) = tail(dir.path(), None).unwrap();
        let got: Vec<_> = lines
            .iter()
            .map(|l| format!("{}:{}", l.stream, l.line))
            .collect();
        assert_eq!(
            got,
            ["stdout:one", "stderr:e1", "stdout:two", "stdout:three"]
        );
        assert_eq!(tail(dir.path(), Some(1)).unwrap().0[0].line, "three");
        // Rotation keeps the total bounded and the tail whole.
        let mut out = StreamWriter::new(log.clone(), "stdout");
        for i in 0..200 {
            writeln!(out, "line {i}").unwrap();
        }
        let total = std::fs::metadata(dir.path().join(LOG)).unwrap().len()
            + std::fs::metadata(dir.path().join(LOG_OLD)).unwrap().len();
        assert!(total <= 2 * 2048, "{total}");
        let (lines, _) = tail(dir.path(), Some(3)).unwrap();
        assert_eq!(lines.last().unwrap().line, "line 199");
        // A follower that saw `off` bytes before rotation starts again at 0.
        let (more, _) = read_from(dir.path(), off + 1_000_000).unwrap();
        assert!(!more.is_empty());
    }

    #[test]
    fn long_lines_are_cut_and_a_partial_line_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Mutex::new(LogFile::open(dir.path(), 1 << 20).unwrap()));
        let mut out = StreamWriter::new(log, "stdout");
        out.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
        let (lines, off) = read_from(dir.path(), 0).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].line.len(), MAX_LINE);
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG))
            .unwrap()
            .write_all(b"{\"t_ms\":1,")
            .unwrap();
        let (lines, off2) = read_from(dir.path(), off).unwrap();
        assert!(lines.is_empty());
        assert_eq!(off2, off);
    }
}
