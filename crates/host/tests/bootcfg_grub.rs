//! The merge of IOMMU parameters into /etc/default/grub.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use gpucell_host::bootcfg::grub::{merge, GrubError};
use gpucell_host::bootcfg::{kernel_params, CpuVendor};

fn intel(text: &str) -> Result<String, GrubError> {
    merge(
        Path::new("/etc/default/grub"),
        text,
        &kernel_params(CpuVendor::Intel),
    )
}

fn amd(text: &str) -> Result<String, GrubError> {
    merge(
        Path::new("/etc/default/grub"),
        text,
        &kernel_params(CpuVendor::Amd),
    )
}

const DEBIAN: &str = "# If you change this file, run 'update-grub' afterwards to update
# /boot/grub/grub.cfg.

GRUB_DEFAULT=0
GRUB_TIMEOUT=5
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"
GRUB_CMDLINE_LINUX=\"\"

# Uncomment to disable graphical terminal
#GRUB_TERMINAL=console
";

#[test]
fn double_quoted_default_gets_both_params_and_nothing_else_changes() {
    let out = intel(DEBIAN).unwrap();
    let expected = DEBIAN.replace(
        "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"",
        "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet intel_iommu=on iommu=pt\"",
    );
    assert_eq!(out, expected);
    // Merging again changes nothing.
    assert_eq!(intel(&out).unwrap(), out);
}

#[test]
fn amd_gets_amd_iommu() {
    let out = amd("GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n").unwrap();
    assert_eq!(
        out,
        "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet amd_iommu=on iommu=pt\"\n"
    );
}

#[test]
fn single_quotes_and_export_and_trailing_comment_are_kept() {
    let out = intel("export GRUB_CMDLINE_LINUX_DEFAULT='quiet splash'   # desktop\n").unwrap();
    assert_eq!(
        out,
        "export GRUB_CMDLINE_LINUX_DEFAULT='quiet splash intel_iommu=on iommu=pt'   # desktop\n"
    );
}

#[test]
fn unquoted_value_becomes_quoted_when_it_grows() {
    assert_eq!(
        intel("GRUB_CMDLINE_LINUX_DEFAULT=quiet\n").unwrap(),
        "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet intel_iommu=on iommu=pt\"\n"
    );
    assert_eq!(
        intel("GRUB_CMDLINE_LINUX_DEFAULT=\n").unwrap(),
        "GRUB_CMDLINE_LINUX_DEFAULT=\"intel_iommu=on iommu=pt\"\n"
    );
}

#[test]
fn existing_params_are_not_duplicated() {
    let text = "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet intel_iommu=on iommu=pt\"\n";
    assert_eq!(intel(text).unwrap(), text);
    // Present in GRUB_CMDLINE_LINUX already: not added to the default variable.
    let text =
        "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\nGRUB_CMDLINE_LINUX=\"intel_iommu=on iommu=pt\"\n";
    assert_eq!(intel(text).unwrap(), text);
    // Dash spelling and extra options count as present.
    let text = "GRUB_CMDLINE_LINUX_DEFAULT=\"intel-iommu=on,sm_on iommu=pt\"\n";
    assert_eq!(intel(text).unwrap(), text);
}

#[test]
fn duplicates_of_managed_params_are_collapsed() {
    let out = intel(
        "GRUB_CMDLINE_LINUX_DEFAULT=\"iommu=pt quiet iommu=pt intel_iommu=on intel_iommu=on\"\n",
    )
    .unwrap();
    assert_eq!(
        out,
        "GRUB_CMDLINE_LINUX_DEFAULT=\"iommu=pt quiet intel_iommu=on\"\n"
    );
    let out = intel("GRUB_CMDLINE_LINUX=\"iommu=pt\"\nGRUB_CMDLINE_LINUX_DEFAULT=\"iommu=pt\"\n")
        .unwrap();
    assert_eq!(
        out,
        "GRUB_CMDLINE_LINUX=\"iommu=pt\"\nGRUB_CMDLINE_LINUX_DEFAULT=\"intel_iommu=on\"\n"
    );
}

#[test]
fn conflicting_values_are_replaced() {
    assert_eq!(
        intel("GRUB_CMDLINE_LINUX_DEFAULT=\"quiet intel_iommu=off iommu=nopt\"\n").unwrap(),
        "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet intel_iommu=on iommu=pt\"\n"
    );
    // A conflict in the other variable is removed there too; other options survive.
    assert_eq!(
        intel("GRUB_CMDLINE_LINUX=\"console=ttyS0 intel_iommu=igfx_off,off\"\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n").unwrap(),
        "GRUB_CMDLINE_LINUX=\"console=ttyS0 intel_iommu=igfx_off\"\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet intel_iommu=on iommu=pt\"\n"
    );
    assert_eq!(
        amd("GRUB_CMDLINE_LINUX_DEFAULT=\"amd_iommu=off iommu=off\"\n").unwrap(),
        "GRUB_CMDLINE_LINUX_DEFAULT=\"amd_iommu=on iommu=pt\"\n"
    );
}

#[test]
fn missing_variable_is_appended_or_linux_is_used() {
    assert_eq!(
        intel("GRUB_TIMEOUT=5").unwrap(),
        "GRUB_TIMEOUT=5\n# Added by gpucell: IOMMU on for VFIO GPU passthrough.\nGRUB_CMDLINE_LINUX_DEFAULT=\"intel_iommu=on iommu=pt\"\n"
    );
    assert_eq!(
        intel("GRUB_CMDLINE_LINUX=\"console=ttyS0\"\n").unwrap(),
        "GRUB_CMDLINE_LINUX=\"console=ttyS0 intel_iommu=on iommu=pt\"\n"
    );
    // The last assignment wins in shell, so it is the one edited.
    assert_eq!(
        intel("GRUB_CMDLINE_LINUX_DEFAULT=\"a\"\nGRUB_CMDLINE_LINUX_DEFAULT=\"b\"\n").unwrap(),
        "GRUB_CMDLINE_LINUX_DEFAULT=\"a\"\nGRUB_CMDLINE_LINUX_DEFAULT=\"b intel_iommu=on iommu=pt\"\n"
    );
}

#[test]
fn comments_and_commented_assignments_are_left_alone() {
    let text = "#GRUB_CMDLINE_LINUX_DEFAULT=\"intel_iommu=off\"\n  # GRUB_CMDLINE_LINUX=\"x\"\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\" # keep me\n";
    assert_eq!(
        intel(text).unwrap(),
        "#GRUB_CMDLINE_LINUX_DEFAULT=\"intel_iommu=off\"\n  # GRUB_CMDLINE_LINUX=\"x\"\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet intel_iommu=on iommu=pt\" # keep me\n"
    );
}

#[test]
fn crlf_line_endings_survive() {
    assert_eq!(
        intel("GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\r\nGRUB_TIMEOUT=5\r\n").unwrap(),
        "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet intel_iommu=on iommu=pt\"\r\nGRUB_TIMEOUT=5\r\n"
    );
}

#[test]
fn shell_it_cannot_rewrite_is_refused_with_the_line() {
    for (text, line) in [
        (
            "GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\n splash\"\n",
            2,
        ),
        ("GRUB_CMDLINE_LINUX_DEFAULT=\"$(cat /etc/cmdline)\"\n", 1),
        ("GRUB_CMDLINE_LINUX_DEFAULT=\"a \\\"b\\\"\"\n", 1),
        ("GRUB_CMDLINE_LINUX_DEFAULT=\"a\"'b'\n", 1),
        ("GRUB_CMDLINE_LINUX=quiet splash\n", 1),
        ("GRUB_CMDLINE_LINUX=\"a\"#x\n", 1),
    ] {
        match intel(text) {
            Err(GrubError::Uneditable {
                line: l,
                ref wanted,
                ..
            }) => {
                assert_eq!(l, line, "{text:?}");
                assert_eq!(wanted, "intel_iommu=on iommu=pt");
            }
            other => panic!("{text:?} gave {other:?}"),
        }
    }
    let msg = intel("GRUB_CMDLINE_LINUX_DEFAULT=\"$(x)\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("/etc/default/grub:1") && msg.contains("by hand"),
        "{msg}"
    );
}

#[test]
fn self_references_are_kept_as_opaque_tokens() {
    assert_eq!(
        intel("GRUB_CMDLINE_LINUX_DEFAULT=\"$GRUB_CMDLINE_LINUX_DEFAULT quiet\"\n").unwrap(),
        "GRUB_CMDLINE_LINUX_DEFAULT=\"$GRUB_CMDLINE_LINUX_DEFAULT quiet intel_iommu=on iommu=pt\"\n"
    );
}
