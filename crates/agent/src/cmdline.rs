//! The kernel command line as the agent reads it (`/proc/cmdline`).

use gpucell_protocol::CMDLINE_CHANNEL_KEY;

/// Marker the agent prints in probe mode.
pub const PROBE_OK: &str = "gpucell-probe-ok";
const PROBE_KEY: &str = "gpucell.probe";

/// Which transport carries the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Serial,
    Vsock,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// `gpucell.probe=1`: print [`PROBE_OK`] and power off.
    pub probe: bool,
    pub channel: Channel,
}

#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("kernel command line: `{CMDLINE_CHANNEL_KEY}={0}` is not `serial` or `vsock`")]
    BadChannel(String),
}

impl Cmdline {
    /// Parses the command line; the last occurrence of a key wins, as in the kernel.
    pub fn parse(text: &str) -> Result<Self, CmdlineError> {
        let mut out = Cmdline {
            probe: false,
            channel: Channel::Serial,
        };
        for word in text.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            if key == PROBE_KEY {
                out.probe = value == "1";
            } else if key == CMDLINE_CHANNEL_KEY {
                out.channel = match value {
                    "serial" => Channel::Serial,
                    "vsock" => Channel::Vsock,
                    other => {
                        return Err(CmdlineError::BadChannel(other.chars().take(64).collect()))
                    }
                };
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_probe_and_channel() {
        let c = Cmdline::parse("console=ttyS0 panic=-1 quiet\n").unwrap();
        assert_eq!(
            c,
            Cmdline {
                probe: false,
                channel: Channel::Serial
            }
        );
        let c = Cmdline::parse("console=ttyS0 gpucell.probe=1 gpucell.channel=vsock").unwrap();
        assert!(c.probe);
        assert_eq!(c.channel, Channel::Vsock);
        let c =
            Cmdline::parse("gpucell.probe=0 gpucell.channel=vsock gpucell.channel=serial").unwrap();
        assert!(!c.probe);
        assert_eq!(c.channel, Channel::Serial);
        // A key that merely starts like ours is not ours.
        assert!(!Cmdline::parse("gpucell.probex=1").unwrap().probe);
    }

    #[test]
    fn bad_channel_is_named() {
        let err = Cmdline::parse("gpucell.channel=pigeon")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pigeon"), "{err}");
    }
}
