//! Whether a host-side agent socket may be trusted to lead to the guest.
//!
//! Hybrid vsock and virtio-serial have no other guard: whoever can connect to
//! the socket drives the agent, and whoever could create it could pose as the
//! agent. A socket is trusted when it is a socket nobody else can write and its
//! owner is one of:
//! - the user the domain itself runs as (the DAC label of its live XML:
//!   `<seclabel model='dac'><label>+64055:+993</label>`, Debian's
//!   `libvirt-qemu`), which is who creates a `mode='bind'` channel's socket;
//! - root, or the user running vmplug;
//! - an account that is not a login user by `/etc/login.defs`: a uid outside
//!   `UID_MIN..=UID_MAX`, or inside `SYS_UID_MIN..=SYS_UID_MAX` (Debian gives `libvirt-qemu` 64055, from the
//!   60000–64999 range it reserves for system accounts; Fedora's `qemu` is 107).
//!
//! The judgement is a pure function of those facts ([`judge`]); reading them
//! (the socket's metadata, the process's uid, the login.defs file, a user name
//! in the label) is done at the edge, with the file's path passed in.

use std::path::Path;

/// Where the login ranges are read from on a real host.
pub const LOGIN_DEFS: &str = "/etc/login.defs";

/// The uid ranges of `/etc/login.defs` (shadow's defaults where it says nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginDefs {
    pub uid_min: u32,
    pub uid_max: u32,
    pub sys_uid_min: u32,
    pub sys_uid_max: u32,
}

impl Default for LoginDefs {
    /// shadow's built-in values (useradd's, when login.defs is silent).
    fn default() -> Self {
        LoginDefs { uid_min: 1000, uid_max: 60000, sys_uid_min: 101, sys_uid_max: 999 }
    }
}

impl LoginDefs {
    /// Reads `KEY value` lines; `#` comments, unknown keys and unparsable
    /// values are ignored (the default stands), as shadow does.
    pub fn parse(text: &str) -> LoginDefs {
        let mut d = LoginDefs::default();
        let mut sys_max_given = false;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default();
            let mut words = line.split_whitespace();
            let (Some(key), Some(value)) = (words.next(), words.next()) else { continue };
            let Ok(value) = value.parse::<u32>() else { continue };
            match key {
                "UID_MIN" => d.uid_min = value,
                "UID_MAX" => d.uid_max = value,
                "SYS_UID_MIN" => d.sys_uid_min = value,
                "SYS_UID_MAX" => {
                    d.sys_uid_max = value;
                    sys_max_given = true;
                }
                _ => {}
            }
        }
        // shadow: SYS_UID_MAX defaults to UID_MIN - 1.
        if !sys_max_given {
            d.sys_uid_max = d.uid_min.saturating_sub(1);
        }
        d
    }

    /// The ranges of the file at `path`; shadow's defaults when it is absent
    /// or unreadable (said at debug level).
    pub fn read(path: &Path) -> LoginDefs {
        match std::fs::read_to_string(path) {
            Ok(text) => LoginDefs::parse(&text),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "login.defs unreadable; using shadow's default uid ranges");
                LoginDefs::default()
            }
        }
    }

    /// A uid that login users get (`UID_MIN..=UID_MAX`).
    pub fn is_login(&self, uid: u32) -> bool {
        (self.uid_min..=self.uid_max).contains(&uid)
    }

    fn is_system(&self, uid: u32) -> bool {
        (self.sys_uid_min..=self.sys_uid_max).contains(&uid)
    }
}

/// Who owns the domain's process, as its DAC `<seclabel>` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DacUser {
    /// `+64055` (a number), or a name that is all digits.
    Uid(u32),
    /// `libvirt-qemu`: a user name, resolved on this host.
    Name(String),
}

impl DacUser {
    /// The user part of a DAC label, `USER:GROUP` where each is a name or a
    /// number, `+` marking a number (libvirt's `virParseOwnershipIds`).
    pub fn from_label(label: &str) -> Option<DacUser> {
        let user = label.split_once(':').map_or(label, |(u, _)| u).trim();
        if let Some(n) = user.strip_prefix('+') {
            return n.parse().ok().map(DacUser::Uid);
        }
        if user.is_empty() {
            return None;
        }
        Some(DacUser::Name(user.to_string()))
    }

    /// The uid: a number as is; a name looked up in this host's user database
    /// (libvirt falls back on reading an all-digit name as a number, so does this).
    pub fn resolve(&self) -> Option<u32> {
        match self {
            DacUser::Uid(u) => Some(*u),
            DacUser::Name(name) => uid_of(name).or_else(|| name.parse().ok()),
        }
    }
}

/// The uid of user `name` on this host (getpwnam_r), None when there is none.
fn uid_of(name: &str) -> Option<u32> {
    user_ids(name).map(|(uid, _)| uid)
}

/// The uid and primary gid of user `name` on this host (getpwnam_r), None
/// when there is none.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c_name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain data; getpwnam_r fills it (or not) and we read it
    // only when it reports success through `found`.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the NUL-terminated name, the
    // passwd record, a buffer of the length given, and the result pointer.
    let rc = unsafe { libc::getpwnam_r(c_name.as_ptr(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    (rc == 0 && !found.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

/// What vmplug expects of one domain's agent socket: the uid the domain runs
/// as (when its live XML says so) and this host's login ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SocketTrust {
    pub domain_uid: Option<u32>,
    pub login: LoginDefs,
}

impl SocketTrust {
    /// The expectation for a domain whose DAC label names `user`, with the
    /// login ranges of the file at `login_defs`.
    pub fn for_domain(user: Option<&DacUser>, login_defs: &Path) -> SocketTrust {
        let domain_uid = user.and_then(|u| {
            let uid = u.resolve();
            if uid.is_none() {
                tracing::debug!(user = ?u, "the domain's DAC user is unknown on this host");
            }
            uid
        });
        SocketTrust { domain_uid, login: LoginDefs::read(login_defs) }
    }
}

/// Why a socket's owner was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trusted {
    /// The user the domain runs as (its DAC label).
    DomainUser,
    Root,
    /// The user running vmplug.
    Invoker,
    /// Not a login user by login.defs (outside UID_MIN..UID_MAX, or in
    /// SYS_UID_MIN..SYS_UID_MAX): a system account such as QEMU's.
    NotLoginUser,
}

/// Judges a socket by its owner, its permission bits, the uid vmplug runs as
/// and what is expected of the domain. `Err` says why it is refused, in words
/// that name the owner and the rule.
pub fn judge(owner: u32, mode: u32, me: u32, trust: &SocketTrust) -> Result<Trusted, String> {
    if mode & 0o002 != 0 {
        return Err(format!("it is writable by every user (mode {:o})", mode & 0o777));
    }
    if trust.domain_uid == Some(owner) {
        return Ok(Trusted::DomainUser);
    }
    if owner == 0 {
        return Ok(Trusted::Root);
    }
    if owner == me {
        return Ok(Trusted::Invoker);
    }
    let login = &trust.login;
    // SYS_UID_MIN..SYS_UID_MAX wins where a local login.defs makes the ranges overlap.
    if !login.is_login(owner) || login.is_system(owner) {
        return Ok(Trusted::NotLoginUser);
    }
    let domain = match trust.domain_uid {
        Some(u) => format!("the domain runs as uid {u} (its DAC <seclabel>)"),
        None => "the domain's live XML names no DAC user".to_string(),
    };
    Err(format!(
        "it is owned by uid {owner}, a login user by /etc/login.defs (UID_MIN {}..UID_MAX {}), not root, not this user (uid {me}); {domain}: another local user could stand in for the guest agent",
        login.uid_min, login.uid_max
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str =
        "# /etc/login.defs\nUID_MIN\t\t 1000\nUID_MAX\t\t60000\n#SYS_UID_MIN\t\t  100\n#SYS_UID_MAX\t\t  999\n";

    fn trust(domain_uid: Option<u32>, defs: &str) -> SocketTrust {
        SocketTrust { domain_uid, login: LoginDefs::parse(defs) }
    }

    #[test]
    fn login_defs_ranges_are_read_with_shadows_defaults() {
        let d = LoginDefs::parse(DEBIAN);
        assert_eq!(d, LoginDefs { uid_min: 1000, uid_max: 60000, sys_uid_min: 101, sys_uid_max: 999 });
        let d = LoginDefs::parse("UID_MIN 500\nUID_MAX 65000 # wide\nSYS_UID_MIN 200\nBOGUS x\nUID_MAX\n");
        assert_eq!(d, LoginDefs { uid_min: 500, uid_max: 65000, sys_uid_min: 200, sys_uid_max: 499 });
        assert_eq!(LoginDefs::parse(""), LoginDefs::default());
        assert_eq!(LoginDefs::read(Path::new("/nonexistent/login.defs")), LoginDefs::default());
    }

    #[test]
    fn dac_labels_name_a_uid_or_a_user() {
        assert_eq!(DacUser::from_label("+64055:+993"), Some(DacUser::Uid(64055)));
        assert_eq!(DacUser::from_label("libvirt-qemu:kvm"), Some(DacUser::Name("libvirt-qemu".into())));
        assert_eq!(DacUser::from_label("+107"), Some(DacUser::Uid(107)));
        assert_eq!(DacUser::from_label("+x:+1"), None);
        assert_eq!(DacUser::from_label(":kvm"), None);
        assert_eq!(DacUser::Name("root".into()).resolve(), Some(0), "resolved through the user database");
        assert_eq!(DacUser::Name("4242".into()).resolve(), Some(4242), "an unknown all-digit name is a number");
        assert_eq!(DacUser::Name("no-such-user-vmplug".into()).resolve(), None);
    }

    /// The live XML of a running domain carries the DAC label of its process;
    /// a device's own `<seclabel>` and an SELinux label are not it.
    #[test]
    fn the_domain_user_comes_from_the_live_xmls_dac_label() {
        let xml = |labels: &str| {
            format!("<domain type='kvm'><name>d</name><vcpu>1</vcpu><devices><disk><source file='/x'><seclabel model='dac'><label>+1:+1</label></seclabel></source></disk></devices>{labels}</domain>")
        };
        let user = |labels: &str| crate::xml::DomainFacts::parse(&xml(labels)).expect("parses").dac_user;
        let selinux = "<seclabel type='dynamic' model='selinux' relabel='yes'><label>system_u:system_r:svirt_t:s0:c1,c2</label></seclabel>";
        let dac = "<seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+993</label><imagelabel>+64055:+993</imagelabel></seclabel>";
        assert_eq!(user(&format!("{selinux}{dac}")), Some(DacUser::Uid(64055)));
        let named = "<seclabel type='static' model='dac' relabel='no'><label>libvirt-qemu:kvm</label></seclabel>";
        assert_eq!(user(named), Some(DacUser::Name("libvirt-qemu".into())));
        let image_only = "<seclabel type='dynamic' model='dac'><imagelabel>+107:+107</imagelabel></seclabel>";
        assert_eq!(user(image_only), Some(DacUser::Uid(107)));
        assert_eq!(user("<seclabel type='none' model='dac'/>"), None);
        assert_eq!(user(selinux), None, "only the DAC model names a user");
        assert_eq!(user(""), None, "a device's seclabel is not the domain's");
    }

    /// Issue #27: Debian's libvirt-qemu (uid 64055) owns the socket, mode 0775.
    #[test]
    fn the_domains_own_user_is_trusted() {
        // Even where login.defs would call 64055 a login user, the seclabel says
        // it is the domain's.
        let wide = "UID_MIN 1000\nUID_MAX 65000\n";
        assert_eq!(judge(64055, 0o140775, 1000, &trust(Some(64055), wide)), Ok(Trusted::DomainUser));
        let e = judge(64055, 0o140775, 1000, &trust(None, wide)).expect_err("a login user, no seclabel");
        assert!(e.contains("owned by uid 64055") && e.contains("names no DAC user"), "{e}");
    }

    #[test]
    fn a_system_account_outside_the_login_range_is_trusted() {
        assert_eq!(judge(64055, 0o140775, 1000, &trust(None, DEBIAN)), Ok(Trusted::NotLoginUser));
        assert_eq!(judge(107, 0o140775, 1000, &trust(None, DEBIAN)), Ok(Trusted::NotLoginUser), "Fedora's qemu");
        assert_eq!(judge(0, 0o140755, 1000, &trust(None, DEBIAN)), Ok(Trusted::Root));
        assert_eq!(judge(1000, 0o140755, 1000, &trust(None, DEBIAN)), Ok(Trusted::Invoker));
    }

    #[test]
    fn another_login_user_is_refused_naming_the_cause() {
        let e = judge(1500, 0o140775, 1000, &trust(Some(64055), DEBIAN)).expect_err("a login user");
        assert!(e.contains("owned by uid 1500"), "{e}");
        assert!(e.contains("login user by /etc/login.defs (UID_MIN 1000..UID_MAX 60000)"), "{e}");
        assert!(e.contains("the domain runs as uid 64055"), "{e}");
        assert!(e.contains("not this user (uid 1000)"), "{e}");
    }

    #[test]
    fn a_world_writable_socket_is_refused_whoever_owns_it() {
        for owner in [0, 1000, 64055] {
            let e = judge(owner, 0o140777, 1000, &trust(Some(64055), DEBIAN)).expect_err("world-writable");
            assert!(e.contains("writable by every user (mode 777)"), "{e}");
        }
    }
}
