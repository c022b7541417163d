//! The `BOOTS_DEFAULT_*` lookup: what an unknown machine (or a job that gives
//! no kernel/initrd) boots.
//!
//! For a (bootloader, architecture, platform) triple, each of the kernel, the
//! initrd and the kernel command line is resolved **independently** through
//! six levels, most specific first; the first variable that is set to a
//! non-empty value wins:
//!
//! 1. `BOOTS_DEFAULT_${BOOTLOADER}_${ARCH}_${PLATFORM}_<ITEM>`
//! 2. `BOOTS_DEFAULT_${ARCH}_${PLATFORM}_<ITEM>`
//! 3. `BOOTS_DEFAULT_${BOOTLOADER}_${ARCH}_<ITEM>`
//! 4. `BOOTS_DEFAULT_${ARCH}_<ITEM>`
//! 5. `BOOTS_DEFAULT_${BOOTLOADER}_<ITEM>`
//! 6. `BOOTS_DEFAULT_<ITEM>`
//!
//! where `<ITEM>` is `KERNEL`, `INITRD` or `CMDLINE`. When the architecture or
//! the platform is unknown (`None`), every level that names it is skipped.
//!
//! [`BootDefaults::from_env_map`] adds the seed's defaults for level 6 when
//! those variables are absent from the environment; setting one of them to an
//! empty value removes that default (and a lookup that finds nothing else then
//! fails with [`MissingBootDefault`]).
//!
//! ```
//! use vivian_core::config::{Arch, BootDefaults, BootItem, Bootloader, Platform};
//!
//! let defaults = BootDefaults::from_vars([
//!     ("BOOTS_DEFAULT_X86_64_KERNEL", "http://gw/x86_64/kernel"),
//!     ("BOOTS_DEFAULT_ARM64_EFI_KERNEL", "http://gw/arm64/kernel.efi"),
//!     ("BOOTS_DEFAULT_INITRD", "http://gw/initrd"),
//!     ("BOOTS_DEFAULT_CMDLINE", "loglevel=6"),
//! ]);
//! // `boot.ipxe?platform=efi&buildarch=x86_64`
//! let arch = "x86_64".parse::<Arch>().ok();
//! let platform = "efi".parse::<Platform>().ok();
//! let boot = defaults.resolve(Bootloader::Ipxe, arch, platform).unwrap();
//! assert_eq!(boot.kernel, "http://gw/x86_64/kernel");
//! assert_eq!(boot.initrd, "http://gw/initrd");
//!
//! // ARM64 has a kernel for EFI only: the error names what was tried.
//! let err = defaults
//!     .lookup(BootItem::Kernel, Bootloader::Ipxe, Some(Arch::Arm64), Some(Platform::Pcbios))
//!     .unwrap_err();
//! assert!(err.to_string().starts_with(
//!     "no default kernel found: set one of BOOTS_DEFAULT_IPXE_ARM64_PCBIOS_KERNEL, "
//! ));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Prefix shared by every boot-default variable.
pub const BOOTS_DEFAULT_PREFIX: &str = "BOOTS_DEFAULT_";

/// The seed's default for `BOOTS_DEFAULT_KERNEL`.
pub const SEED_DEFAULT_KERNEL: &str = "http://ci-gateway:9000/boot/default_kernel";
/// The seed's default for `BOOTS_DEFAULT_INITRD`.
pub const SEED_DEFAULT_INITRD: &str = "http://ci-gateway:9000/boot/default_boot2container.cpio.xz";
/// The seed's default for `BOOTS_DEFAULT_CMDLINE` (the registration container).
pub const SEED_DEFAULT_CMDLINE: &str = "b2c.container=\"-ti --tls-verify=false docker://ci-gateway:8002/gfx-ci/ci-tron/machine-registration:latest register\" b2c.ntp_peer=\"ci-gateway\" b2c.cache_device=none loglevel=6";

/// Error for a bootloader, architecture, platform or item name that is not
/// one of the accepted values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}: expected one of {accepted}")]
pub struct UnknownName {
    /// What was being parsed ("bootloader", "architecture", ...).
    pub kind: &'static str,
    /// The value given.
    pub value: String,
    /// The accepted values, comma separated.
    pub accepted: &'static str,
}

macro_rules! name_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $kind:literal, $accepted:literal {
            $( $(#[$vmeta:meta])* $variant:ident => $var:literal, $lower:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $lower)] $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The upper-case form used in `BOOTS_DEFAULT_*` variable names.
            pub fn var_part(self) -> &'static str {
                match self { $($name::$variant => $var),+ }
            }

            /// The lower-case form used on the wire (iPXE's `${buildarch}` /
            /// `${platform}`, MarsDB, URLs).
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $lower),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;
            /// Parses the lower-case or upper-case form (case-insensitive).
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                let t = s.trim();
                $( if t.eq_ignore_ascii_case($lower) { return Ok($name::$variant); } )+
                Err(UnknownName { kind: $kind, value: s.to_string(), accepted: $accepted })
            }
        }
    };
}

name_enum! {
    /// The bootloader asking for a boot configuration.
    Bootloader, "bootloader", "ipxe, uboot, fastboot" {
        /// iPXE (`boot.ipxe`).
        Ipxe => "IPXE", "ipxe",
        /// U-Boot (`boot.scr`).
        Uboot => "UBOOT", "uboot",
        /// Android fastboot.
        Fastboot => "FASTBOOT", "fastboot",
    }
}

name_enum! {
    /// The CPU architecture of the booting machine (iPXE's `${buildarch}`).
    Arch, "architecture", "i386, x86_64, arm32, arm64" {
        /// 32-bit x86 (also what BIOS iPXE reports on x86-64 machines).
        I386 => "I386", "i386",
        /// 64-bit x86.
        X86_64 => "X86_64", "x86_64",
        /// 32-bit ARM.
        Arm32 => "ARM32", "arm32",
        /// 64-bit ARM.
        Arm64 => "ARM64", "arm64",
    }
}

name_enum! {
    /// The firmware platform of the booting machine (iPXE's `${platform}`).
    Platform, "platform", "pcbios, efi, uboot" {
        /// Legacy PC BIOS.
        Pcbios => "PCBIOS", "pcbios",
        /// UEFI.
        Efi => "EFI", "efi",
        /// U-Boot (used by the U-Boot boot script).
        Uboot => "UBOOT", "uboot",
    }
}

name_enum! {
    /// One of the three things a boot configuration is made of.
    BootItem, "boot item", "kernel, initrd, cmdline" {
        /// The kernel image URL.
        Kernel => "KERNEL", "kernel",
        /// The initramfs URL.
        Initrd => "INITRD", "initrd",
        /// The kernel command line.
        Cmdline => "CMDLINE", "cmdline",
    }
}

impl BootItem {
    /// A human name for error messages ("kernel", "initramfs", "kernel command line").
    pub fn human_name(self) -> &'static str {
        match self {
            BootItem::Kernel => "kernel",
            BootItem::Initrd => "initramfs",
            BootItem::Cmdline => "kernel command line",
        }
    }
}

/// A fully resolved default boot configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootConfig {
    /// Kernel URL.
    pub kernel: String,
    /// Initramfs URL.
    pub initrd: String,
    /// Kernel command line.
    pub cmdline: String,
}

/// No default was found for one item: names the item and every variable
/// tried, in the order tried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no default {} found: set one of {}", .item.human_name(), .tried.join(", "))]
pub struct MissingBootDefault {
    /// The item that has no default.
    pub item: BootItem,
    /// The variables tried, most specific first.
    pub tried: Vec<String>,
}

/// [`BootDefaults::resolve`] failed: one or more items have no default.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("incomplete default boot configuration for {context}: {}", .missing.iter().map(|m| m.to_string()).collect::<Vec<_>>().join("; "))]
pub struct BootDefaultsError {
    /// The triple looked up, e.g. `bootloader=ipxe arch=x86_64 platform=efi`.
    pub context: String,
    /// Every missing item (at least one).
    pub missing: Vec<MissingBootDefault>,
}

/// The `BOOTS_DEFAULT_*` variables (name → non-empty value), ready for lookups.
///
/// Cheap to clone; lookups never allocate more than the candidate names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootDefaults {
    vars: BTreeMap<String, String>,
}

impl BootDefaults {
    /// Builds the table from an environment map: keeps every non-empty
    /// `BOOTS_DEFAULT_*` variable and adds the seed's defaults for
    /// `BOOTS_DEFAULT_KERNEL`, `_INITRD` and `_CMDLINE` when those are absent
    /// (an empty value removes the default).
    pub fn from_env_map(env: &BTreeMap<String, String>) -> Self {
        let mut vars: BTreeMap<String, String> = env
            .iter()
            .filter(|(k, v)| k.starts_with(BOOTS_DEFAULT_PREFIX) && !v.is_empty())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (item, default) in [
            (BootItem::Kernel, SEED_DEFAULT_KERNEL),
            (BootItem::Initrd, SEED_DEFAULT_INITRD),
            (BootItem::Cmdline, SEED_DEFAULT_CMDLINE),
        ] {
            let name = format!("{BOOTS_DEFAULT_PREFIX}{}", item.var_part());
            if !env.contains_key(&name) {
                vars.insert(name, default.to_string());
            }
        }
        BootDefaults { vars }
    }

    /// Builds the table from exactly these variables (no seed defaults).
    /// Entries that do not start with `BOOTS_DEFAULT_` or are empty are ignored.
    pub fn from_vars<I, K, V>(vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        BootDefaults {
            vars: vars
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .filter(|(k, v)| k.starts_with(BOOTS_DEFAULT_PREFIX) && !v.is_empty())
                .collect(),
        }
    }

    /// The variables in force (name → value), sorted by name.
    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.vars
    }

    /// The variable names tried for `item`, most specific first (up to six;
    /// levels naming an unknown `arch` or `platform` are left out).
    pub fn candidates(
        item: BootItem,
        bootloader: Bootloader,
        arch: Option<Arch>,
        platform: Option<Platform>,
    ) -> Vec<String> {
        let bl = Some(bootloader.var_part());
        let ar = arch.map(Arch::var_part);
        let pl = platform.map(Platform::var_part);
        // The six levels of the seed, each a list of fields (None = unknown).
        let levels: [&[Option<&str>]; 6] = [&[bl, ar, pl], &[ar, pl], &[bl, ar], &[ar], &[bl], &[]];
        levels
            .iter()
            .filter(|fields| fields.iter().all(Option::is_some))
            .map(|fields| {
                let mut name = String::from(BOOTS_DEFAULT_PREFIX);
                for f in fields.iter().flatten() {
                    name.push_str(f);
                    name.push('_');
                }
                name.push_str(item.var_part());
                name
            })
            .collect()
    }

    /// Looks up one item; on success returns the value and the variable
    /// it came from.
    pub fn lookup_with_source(
        &self,
        item: BootItem,
        bootloader: Bootloader,
        arch: Option<Arch>,
        platform: Option<Platform>,
    ) -> Result<(&str, String), MissingBootDefault> {
        let tried = Self::candidates(item, bootloader, arch, platform);
        for name in &tried {
            if let Some(v) = self.vars.get(name) {
                return Ok((v.as_str(), name.clone()));
            }
        }
        Err(MissingBootDefault { item, tried })
    }

    /// Looks up one item (kernel, initrd or cmdline).
    pub fn lookup(
        &self,
        item: BootItem,
        bootloader: Bootloader,
        arch: Option<Arch>,
        platform: Option<Platform>,
    ) -> Result<&str, MissingBootDefault> {
        self.lookup_with_source(item, bootloader, arch, platform)
            .map(|(v, _)| v)
    }

    /// Resolves kernel, initrd and cmdline, each independently. The error
    /// lists every missing item and the variables tried for it.
    pub fn resolve(
        &self,
        bootloader: Bootloader,
        arch: Option<Arch>,
        platform: Option<Platform>,
    ) -> Result<BootConfig, BootDefaultsError> {
        let kernel = self.lookup(BootItem::Kernel, bootloader, arch, platform);
        let initrd = self.lookup(BootItem::Initrd, bootloader, arch, platform);
        let cmdline = self.lookup(BootItem::Cmdline, bootloader, arch, platform);
        match (kernel, initrd, cmdline) {
            (Ok(k), Ok(i), Ok(c)) => Ok(BootConfig {
                kernel: k.to_string(),
                initrd: i.to_string(),
                cmdline: c.to_string(),
            }),
            (k, i, c) => Err(BootDefaultsError {
                context: format!(
                    "bootloader={} arch={} platform={}",
                    bootloader,
                    arch.map_or("(unknown)", Arch::as_str),
                    platform.map_or("(unknown)", Platform::as_str)
                ),
                missing: [k.err(), i.err(), c.err()].into_iter().flatten().collect(),
            }),
        }
    }

    /// Variables whose name matches no level for any known bootloader,
    /// architecture, platform and item: most likely typos. Reported as
    /// warnings by `executor --check-config`.
    pub fn unrecognised_vars(&self) -> Vec<&str> {
        self.vars
            .keys()
            .filter(|name| !is_known_var_name(name))
            .map(String::as_str)
            .collect()
    }
}

/// Whether `name` is a `BOOTS_DEFAULT_*` variable that some lookup can read.
pub fn is_known_var_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(BOOTS_DEFAULT_PREFIX) else {
        return false;
    };
    let Some(item_start) = BootItem::ALL
        .iter()
        .find_map(|item| rest.strip_suffix(item.var_part()).map(str::len))
    else {
        return false;
    };
    let fields = &rest[..item_start];
    if fields.is_empty() {
        return true;
    }
    let Some(fields) = fields.strip_suffix('_') else {
        return false;
    };
    // Candidate shapes: [bl]? [arch]? [platform]? with the constraints of the
    // six levels (platform needs arch).
    for bl in std::iter::once(None).chain(Bootloader::ALL.iter().copied().map(Some)) {
        for ar in std::iter::once(None).chain(Arch::ALL.iter().copied().map(Some)) {
            for pl in std::iter::once(None).chain(Platform::ALL.iter().copied().map(Some)) {
                if pl.is_some() && ar.is_none() {
                    continue;
                }
                let parts: Vec<&str> = [
                    bl.map(Bootloader::var_part),
                    ar.map(Arch::var_part),
                    pl.map(Platform::var_part),
                ]
                .into_iter()
                .flatten()
                .collect();
                if !parts.is_empty() && parts.join("_") == fields {
                    return true;
                }
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(vars: &[(&str, &str)]) -> BootDefaults {
        BootDefaults::from_vars(
            vars.iter()
                .map(|(k, v)| (format!("BOOTS_DEFAULT_{k}"), v.to_string())),
        )
    }

    /// The reference's test vector (infra B.6).
    fn reference_vector() -> BootDefaults {
        defaults(&[
            ("IPXE_X86_64_EFI_KERNEL", "ipxe_x86_64_efi"),
            ("X86_64_EFI_KERNEL", "x86_64_efi"),
            ("IPXE_X86_64_KERNEL", "ipxe_x86_64"),
            ("X86_64_KERNEL", "x86_64"),
            ("IPXE_KERNEL", "ipxe"),
            ("X86_64_INITRD", "x86_64"),
            ("IPXE_ARM64_PCBIOS_KERNEL", "ipxe_arm64_pcbios"),
            ("ARM64_EFI_INITRD", "arm64_efi"),
            ("ARM64_CMDLINE", "arm64"),
            ("KERNEL", "default"),
            ("INITRD", "default"),
            ("CMDLINE", "default"),
        ])
    }

    #[test]
    fn reference_test_vector() {
        let d = reference_vector();
        type Case = (
            Bootloader,
            Option<Arch>,
            Option<Platform>,
            (&'static str, &'static str, &'static str),
        );
        let cases: &[Case] = &[
            (
                Bootloader::Ipxe,
                Some(Arch::X86_64),
                Some(Platform::Efi),
                ("ipxe_x86_64_efi", "x86_64", "default"),
            ),
            (
                Bootloader::Uboot,
                Some(Arch::Arm64),
                Some(Platform::Efi),
                ("default", "arm64_efi", "arm64"),
            ),
            // Further walks through the same table, one level at a time.
            (
                Bootloader::Uboot,
                Some(Arch::X86_64),
                Some(Platform::Efi),
                ("x86_64_efi", "x86_64", "default"),
            ),
            (
                Bootloader::Ipxe,
                Some(Arch::X86_64),
                Some(Platform::Pcbios),
                ("ipxe_x86_64", "x86_64", "default"),
            ),
            (
                Bootloader::Fastboot,
                Some(Arch::X86_64),
                Some(Platform::Pcbios),
                ("x86_64", "x86_64", "default"),
            ),
            (
                Bootloader::Ipxe,
                Some(Arch::I386),
                Some(Platform::Pcbios),
                ("ipxe", "default", "default"),
            ),
            (
                Bootloader::Ipxe,
                Some(Arch::Arm64),
                Some(Platform::Pcbios),
                ("ipxe_arm64_pcbios", "default", "arm64"),
            ),
            (Bootloader::Ipxe, None, None, ("ipxe", "default", "default")),
            (
                Bootloader::Uboot,
                None,
                Some(Platform::Efi),
                ("default", "default", "default"),
            ),
            (
                Bootloader::Uboot,
                Some(Arch::Arm64),
                None,
                ("default", "default", "arm64"),
            ),
        ];
        for (bl, ar, pl, (k, i, c)) in cases {
            let got = d.resolve(*bl, *ar, *pl).unwrap();
            assert_eq!(
                (
                    got.kernel.as_str(),
                    got.initrd.as_str(),
                    got.cmdline.as_str()
                ),
                (*k, *i, *c),
                "case {bl:?} {ar:?} {pl:?}"
            );
        }
    }

    #[test]
    fn seed_example() {
        // The seed's example: x86_64 (PCBIOS or EFI) and ARM64 (EFI only).
        let d = defaults(&[
            (
                "X86_64_KERNEL",
                "https://ci-gateway:9000/boot/default_x86_64_kernel",
            ),
            (
                "X86_64_INITRD",
                "https://ci-gateway:9000/boot/default_x86_64_initrd",
            ),
            (
                "ARM64_EFI_KERNEL",
                "https://ci-gateway:9000/boot/default_arm64_kernel.efi",
            ),
            (
                "ARM64_INITRD",
                "https://ci-gateway:9000/boot/default_arm64_initrd",
            ),
            ("CMDLINE", "loglevel=6"),
        ]);
        for pl in [Platform::Pcbios, Platform::Efi] {
            let c = d
                .resolve(Bootloader::Ipxe, Some(Arch::X86_64), Some(pl))
                .unwrap();
            assert_eq!(
                c.kernel,
                "https://ci-gateway:9000/boot/default_x86_64_kernel"
            );
            assert_eq!(c.cmdline, "loglevel=6");
        }
        let c = d
            .resolve(Bootloader::Ipxe, Some(Arch::Arm64), Some(Platform::Efi))
            .unwrap();
        assert_eq!(
            c.kernel,
            "https://ci-gateway:9000/boot/default_arm64_kernel.efi"
        );
        assert_eq!(
            c.initrd,
            "https://ci-gateway:9000/boot/default_arm64_initrd"
        );
        // ARM64 on PCBIOS has no kernel: the error names it and the variables tried.
        let e = d
            .resolve(Bootloader::Ipxe, Some(Arch::Arm64), Some(Platform::Pcbios))
            .unwrap_err();
        assert_eq!(e.missing.len(), 1);
        assert_eq!(e.missing[0].item, BootItem::Kernel);
        assert_eq!(
            e.missing[0].tried,
            vec![
                "BOOTS_DEFAULT_IPXE_ARM64_PCBIOS_KERNEL",
                "BOOTS_DEFAULT_ARM64_PCBIOS_KERNEL",
                "BOOTS_DEFAULT_IPXE_ARM64_KERNEL",
                "BOOTS_DEFAULT_ARM64_KERNEL",
                "BOOTS_DEFAULT_IPXE_KERNEL",
                "BOOTS_DEFAULT_KERNEL",
            ]
        );
        let msg = e.to_string();
        assert!(msg.contains("no default kernel found"), "{msg}");
        assert!(msg.contains("BOOTS_DEFAULT_ARM64_PCBIOS_KERNEL"), "{msg}");
        assert!(msg.contains("arch=arm64 platform=pcbios"), "{msg}");
    }

    #[test]
    fn candidates_skip_unknown_fields() {
        assert_eq!(
            BootDefaults::candidates(
                BootItem::Initrd,
                Bootloader::Ipxe,
                None,
                Some(Platform::Efi)
            ),
            vec!["BOOTS_DEFAULT_IPXE_INITRD", "BOOTS_DEFAULT_INITRD"]
        );
        assert_eq!(
            BootDefaults::candidates(BootItem::Cmdline, Bootloader::Ipxe, Some(Arch::I386), None),
            vec![
                "BOOTS_DEFAULT_IPXE_I386_CMDLINE",
                "BOOTS_DEFAULT_I386_CMDLINE",
                "BOOTS_DEFAULT_IPXE_CMDLINE",
                "BOOTS_DEFAULT_CMDLINE"
            ]
        );
    }

    #[test]
    fn every_item_missing_is_reported() {
        let e = BootDefaults::default()
            .resolve(Bootloader::Ipxe, Some(Arch::X86_64), Some(Platform::Efi))
            .unwrap_err();
        let items: Vec<BootItem> = e.missing.iter().map(|m| m.item).collect();
        assert_eq!(
            items,
            vec![BootItem::Kernel, BootItem::Initrd, BootItem::Cmdline]
        );
        assert!(e.to_string().contains("no default initramfs found"));
        assert!(e
            .to_string()
            .contains("no default kernel command line found"));
    }

    #[test]
    fn env_map_seed_defaults_and_empty_values() {
        let env: BTreeMap<String, String> = [
            ("BOOTS_DEFAULT_CMDLINE", ""),
            ("BOOTS_DEFAULT_X86_64_KERNEL", "k64"),
            ("BOOTS_DEFAULT_ARM64_KERNEL", ""),
            ("EXECUTOR_URL", "http://x"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let d = BootDefaults::from_env_map(&env);
        assert_eq!(
            d.lookup(BootItem::Kernel, Bootloader::Ipxe, Some(Arch::X86_64), None),
            Ok("k64")
        );
        // Absent: the seed's default.
        assert_eq!(
            d.lookup(BootItem::Kernel, Bootloader::Ipxe, Some(Arch::Arm64), None),
            Ok(SEED_DEFAULT_KERNEL)
        );
        assert_eq!(
            d.lookup(BootItem::Initrd, Bootloader::Ipxe, None, None),
            Ok(SEED_DEFAULT_INITRD)
        );
        // Explicitly empty: no default.
        let e = d
            .lookup(BootItem::Cmdline, Bootloader::Ipxe, None, None)
            .unwrap_err();
        assert_eq!(
            e.tried,
            vec!["BOOTS_DEFAULT_IPXE_CMDLINE", "BOOTS_DEFAULT_CMDLINE"]
        );
        assert!(!d.vars().contains_key("EXECUTOR_URL"));
    }

    #[test]
    fn name_parsing() {
        assert_eq!("x86_64".parse::<Arch>(), Ok(Arch::X86_64));
        assert_eq!("ARM64".parse::<Arch>(), Ok(Arch::Arm64));
        assert_eq!("pcbios".parse::<Platform>(), Ok(Platform::Pcbios));
        assert_eq!("iPXE".parse::<Bootloader>(), Ok(Bootloader::Ipxe));
        let e = "riscv64".parse::<Arch>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown architecture \"riscv64\": expected one of i386, x86_64, arm32, arm64"
        );
        assert_eq!(serde_json::to_string(&Arch::X86_64).unwrap(), "\"x86_64\"");
    }

    #[test]
    fn unrecognised_names() {
        let d = defaults(&[
            ("X86_64_KERNEL", "a"),
            ("IPXE_ARM64_EFI_CMDLINE", "b"),
            ("KERNEL", "c"),
            ("X86-64_KERNEL", "typo"),
            ("EFI_KERNEL", "platform without arch is never read"),
            ("X86_64_KERNAL", "typo"),
        ]);
        assert_eq!(
            d.unrecognised_vars(),
            vec![
                "BOOTS_DEFAULT_EFI_KERNEL",
                "BOOTS_DEFAULT_X86-64_KERNEL",
                "BOOTS_DEFAULT_X86_64_KERNAL"
            ]
        );
    }
}
