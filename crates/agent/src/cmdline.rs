//! The kernel command line as the agent reads it (`/proc/cmdline`).

use gpucell_protocol::{
    CMDLINE_CHANNEL_KEY, CMDLINE_ROOTFS_KEY, CMDLINE_VSOCK_PORT_KEY, VSOCK_PORT,
};

/// Marker the agent prints in probe mode.
pub const PROBE_OK: &str = "gpucell-probe-ok";
const PROBE_KEY: &str = "gpucell.probe";
/// `gpucell.driver_test=1`: `gpucell guest test` boots the guest to check its driver.
const DRIVER_TEST_KEY: &str = "gpucell.driver_test";

/// Which transport carries the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Serial,
    /// vsock to the host (CID 2) on this port.
    Vsock {
        port: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// `gpucell.probe=1`: print [`PROBE_OK`] and power off.
    pub probe: bool,
    pub channel: Channel,
    /// `gpucell.rootfs=`: the image filesystem of this boot, if the host said.
    pub rootfs: Option<String>,
    /// `gpucell.driver_test=1`: check the driver flavour, print the result, power off.
    pub driver_test: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("kernel command line: `{CMDLINE_CHANNEL_KEY}={0}` is not `serial` or `vsock`")]
    BadChannel(String),
    #[error(
        "kernel command line: `{CMDLINE_VSOCK_PORT_KEY}={0}` is not a vsock port (1 to 4294967294)"
    )]
    BadPort(String),
}

impl Cmdline {
    /// Whether this boot needs the modules tagged `tag` in the init image's module order
    /// (`always`, `channel=serial|vsock`, `rootfs=<fs>`). An unknown tag is loaded.
    pub fn wants_modules(&self, tag: &str) -> bool {
        match tag.split_once('=') {
            Some(("channel", "serial")) => self.channel == Channel::Serial,
            Some(("channel", "vsock")) => matches!(self.channel, Channel::Vsock { .. }),
            Some(("rootfs", fs)) => self.rootfs.as_deref().is_none_or(|r| r == fs),
            _ => true,
        }
    }

    /// Parses the command line; the last occurrence of a key wins, as in the kernel.
    pub fn parse(text: &str) -> Result<Self, CmdlineError> {
        let mut probe = false;
        let mut vsock = false;
        let mut port = VSOCK_PORT;
        let mut rootfs = None;
        let mut driver_test = false;
        for word in text.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            if key == PROBE_KEY {
                probe = value == "1";
            } else if key == DRIVER_TEST_KEY {
                driver_test = value == "1";
            } else if key == CMDLINE_CHANNEL_KEY {
                vsock = match value {
                    "serial" => false,
                    "vsock" => true,
                    other => {
                        return Err(CmdlineError::BadChannel(other.chars().take(64).collect()))
                    }
                };
            } else if key == CMDLINE_ROOTFS_KEY {
                rootfs = Some(value.chars().take(64).collect());
            } else if key == CMDLINE_VSOCK_PORT_KEY {
                // 0 is not a port to connect to; u32::MAX is VMADDR_PORT_ANY.
                port = match value.parse::<u32>() {
                    Ok(p) if p != 0 && p != u32::MAX => p,
                    _ => return Err(CmdlineError::BadPort(value.chars().take(64).collect())),
                };
            }
        }
        let channel = if vsock {
            Channel::Vsock { port }
        } else {
            Channel::Serial
        };
        Ok(Cmdline {
            probe,
            channel,
            rootfs,
            driver_test,
        })
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
                channel: Channel::Serial,
                rootfs: None,
                driver_test: false,
            }
        );
        assert!(Cmdline::parse("gpucell.driver_test=1").unwrap().driver_test);
        let c = Cmdline::parse("console=ttyS0 gpucell.probe=1 gpucell.channel=vsock").unwrap();
        assert!(c.probe);
        assert_eq!(c.channel, Channel::Vsock { port: VSOCK_PORT });
        let c =
            Cmdline::parse("gpucell.vsock_port=7 gpucell.channel=vsock gpucell.vsock_port=52001")
                .unwrap();
        assert_eq!(c.channel, Channel::Vsock { port: 52001 });
        let c = Cmdline::parse("gpucell.rootfs=ext4 gpucell.rootfs=erofs").unwrap();
        assert_eq!(c.rootfs.as_deref(), Some("erofs"));
        let c =
            Cmdline::parse("gpucell.probe=0 gpucell.channel=vsock gpucell.channel=serial").unwrap();
        assert!(!c.probe);
        assert_eq!(c.channel, Channel::Serial);
        // A key that merely starts like ours is not ours.
        assert!(!Cmdline::parse("gpucell.probex=1").unwrap().probe);
    }

    #[test]
    fn modules_follow_the_channel_and_the_image_filesystem() {
        let c = Cmdline::parse("gpucell.channel=vsock gpucell.rootfs=erofs").unwrap();
        assert!(c.wants_modules("always"));
        assert!(c.wants_modules("channel=vsock"));
        assert!(!c.wants_modules("channel=serial"));
        assert!(c.wants_modules("rootfs=erofs"));
        assert!(!c.wants_modules("rootfs=ext4"));
        assert!(c.wants_modules("gpu=nvidia"), "unknown tags are loaded");
        // No filesystem named: all of them.
        let c = Cmdline::parse("gpucell.channel=serial").unwrap();
        assert!(c.wants_modules("channel=serial"));
        assert!(!c.wants_modules("channel=vsock"));
        assert!(c.wants_modules("rootfs=ext4") && c.wants_modules("rootfs=erofs"));
    }

    #[test]
    fn bad_channel_is_named() {
        let err = Cmdline::parse("gpucell.channel=pigeon")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pigeon"), "{err}");
        for bad in ["0", "4294967295", "-1", "x", "", "99999999999"] {
            let err = Cmdline::parse(&format!("gpucell.channel=vsock gpucell.vsock_port={bad}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("gpucell.vsock_port"), "{bad}: {err}");
        }
    }
}
