//! The task's standard streams: the paths containerd gives in `CreateTaskRequest`.
//! A bare path is a FIFO the client created (a file is appended to); `file://PATH` is a
//! file; an empty path is no stream. The shim opens the FIFOs itself, so that closing
//! them when the task ends is what tells the client the streams are done.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use gpucell_sandbox::SessionIo;

/// Errors opening a task's streams.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("opening the task's {stream} {}", path.display())]
    Open {
        stream: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the task's {stream} {uri:?} uses a scheme gpucell does not support (only FIFO paths and file://)")]
    Scheme { stream: &'static str, uri: String },
}

/// The three paths of a task (or exec), as containerd sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// Opens the output streams now and stdin on first read (a FIFO's open blocks until
    /// the client opens its end).
    pub fn open(&self) -> Result<SessionIo, StdioError> {
        Ok(SessionIo {
            stdout: open_output("stdout", &self.stdout)?,
            stderr: open_output("stderr", &self.stderr)?,
            stdin: open_input(&self.stdin)?,
        })
    }
}

fn local_path(stream: &'static str, uri: &str) -> Result<PathBuf, StdioError> {
    if let Some(p) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(p));
    }
    if uri.contains("://") {
        return Err(StdioError::Scheme {
            stream,
            uri: uri.to_string(),
        });
    }
    Ok(PathBuf::from(uri))
}

fn open_output(stream: &'static str, uri: &str) -> Result<Box<dyn Write + Send>, StdioError> {
    if uri.is_empty() {
        return Ok(Box::new(io::sink()));
    }
    let path = local_path(stream, uri)?;
    let err = |source| StdioError::Open {
        stream,
        path: path.clone(),
        source,
    };
    let fifo = std::fs::metadata(&path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    let file = if fifo {
        // Read-write: the open never blocks, whether or not the client has its end open.
        OpenOptions::new().read(true).write(true).open(&path)
    } else {
        OpenOptions::new().create(true).append(true).open(&path)
    }
    .map_err(err)?;
    Ok(Box::new(file))
}

fn open_input(uri: &str) -> Result<Option<Box<dyn Read + Send>>, StdioError> {
    if uri.is_empty() {
        return Ok(None);
    }
    let path = local_path("stdin", uri)?;
    Ok(Some(Box::new(LazyInput { path, file: None })))
}

/// Opens its path on the first read, from the thread that forwards stdin.
struct LazyInput {
    path: PathBuf,
    file: Option<File>,
}

impl Read for LazyInput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.file.is_none() {
            self.file = Some(File::open(&self.path)?);
        }
        match self.file.as_mut() {
            Some(f) => f.read(buf),
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    }

    #[test]
    fn output_reaches_the_fifo_reader_and_closing_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        mkfifo(&out);
        let paths = StdioPaths {
            stdout: out.to_string_lossy().into(),
            stderr: dir.path().join("err.log").to_string_lossy().into(),
            ..Default::default()
        };
        let mut io = paths.open().unwrap();
        // The shim's end is open: the reader's open does not block.
        let mut reader_end = std::fs::File::open(&out).unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            reader_end.read_to_string(&mut s).unwrap();
            s
        });
        io.stdout.write_all(b"hello\n").unwrap();
        io.stderr.write_all(b"oops\n").unwrap();
        assert!(io.stdin.is_none());
        drop(io);
        assert_eq!(reader.join().unwrap(), "hello\n");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("err.log")).unwrap(),
            "oops\n"
        );
    }

    #[test]
    fn stdin_is_opened_on_first_read() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::write(&input, b"data").unwrap();
        let paths = StdioPaths {
            stdin: input.to_string_lossy().into(),
            ..Default::default()
        };
        let mut io = paths.open().unwrap();
        let mut s = String::new();
        io.stdin.take().unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "data");
    }

    #[test]
    fn unknown_schemes_are_refused() {
        let paths = StdioPaths {
            stdout: "binary:///usr/bin/logger?x=1".into(),
            ..Default::default()
        };
        let err = paths.open().err().unwrap();
        assert!(err.to_string().contains("binary://"), "{err}");
    }
}
