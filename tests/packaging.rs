//! The Debian maintainer script as cargo-deb will expand it (the system test, tests/system,
//! installs the real package in a VM; these catch the script's mistakes without one).

use std::process::Command;

const POSTINST: &str = include_str!("../systemd/debian/postinst");
const TOKEN: &str = "#DEBHELPER#";

/// cargo-deb replaces the first occurrence of the token, even inside a comment: the token
/// once named in the header comment cut it in two, "; here: ..." became a command, and the
/// package's postinst failed with a syntax error on every install.
#[test]
fn the_debhelper_token_stands_once_on_its_own_line() {
    assert_eq!(POSTINST.matches(TOKEN).count(), 1, "{POSTINST}");
    assert!(POSTINST.lines().any(|l| l == TOKEN), "{POSTINST}");
}

#[test]
fn the_expanded_postinst_is_valid_sh() {
    let expanded = POSTINST.replacen(TOKEN, "# Automatically added by cargo-deb\ntrue\n", 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postinst");
    std::fs::write(&path, expanded).unwrap();
    let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The udev rule names group gpio, which sysusers creates: re-running the rule on the chips
/// already there before the group exists leaves them root-only until the next boot.
#[test]
fn gpio_chips_are_retriggered_after_the_group_exists() {
    let sysusers = POSTINST.find("systemd-sysusers").expect("sysusers");
    let trigger = POSTINST.find("udevadm trigger").expect("udevadm trigger");
    let generated = POSTINST.find(TOKEN).unwrap();
    assert!(sysusers < trigger && trigger < generated, "{POSTINST}");
}
