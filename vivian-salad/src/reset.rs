//! Console reset: power-cycling the USB port of a USB serial adapter through
//! sysfs (`<usb port>/port/disable`), as the reference does.

use std::path::Path;

use vivian_core::console::ResetOutcome;

use crate::config::SaladConfig;
use crate::SaladError;

/// Power-cycle the USB port of the serial adapter behind `dev`.
///
/// Unsupported (501 in the HTTP API): not a USB adapter, a hub without
/// per-port power switching, reset disabled by the admin
/// (`SALAD_CONSOLE_USB_RESET_DISABLE=1`), an adapter with several
/// interfaces. Failed (503): the sysfs writes failed.
pub(crate) async fn usb_reset(
    config: &SaladConfig,
    dev: &Path,
    machine_id: &str,
) -> Result<ResetOutcome, SaladError> {
    let canonical = match dev.canonicalize() {
        Ok(c) => c,
        Err(e) => {
            return Err(SaladError::ResetFailed {
                id: machine_id.into(),
                reason: format!("{}: {e}", dev.display()),
            })
        }
    };
    let Some(name) = canonical.file_name() else {
        return Ok(ResetOutcome::Unsupported(
            "Reset only supported on USB-based consoles".into(),
        ));
    };
    let sysfs_dev = config
        .sysfs_root
        .join("class/tty")
        .join(name)
        .canonicalize();
    let port = sysfs_dev.ok().and_then(|d| crate::salad::usb_port_of(&d));
    let Some(port) = port else {
        return Ok(ResetOutcome::Unsupported(
            "Reset only supported on USB-based consoles".into(),
        ));
    };
    let disable = port.join("port/disable");
    if !disable.exists() {
        return Ok(ResetOutcome::Unsupported(
            "The serial console is not connected to a USB hub supporting Per-Port Power Switching"
                .into(),
        ));
    }
    if config.usb_reset_disabled {
        return Ok(ResetOutcome::Unsupported(
            "The serial console reset is disabled by the farm admin".into(),
        ));
    }
    let interfaces = std::fs::read_to_string(port.join("bNumInterfaces"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if interfaces != Some(1) {
        return Ok(ResetOutcome::Unsupported(
            "The serial console is part of a multi-interface USB device".into(),
        ));
    }
    let fail = |e: std::io::Error| SaladError::ResetFailed {
        id: machine_id.into(),
        reason: format!("writing {}: {e}", disable.display()),
    };
    tracing::info!(machine = machine_id, port = %port.display(), "power-cycling the console's USB port");
    tokio::fs::write(&disable, b"1\n").await.map_err(fail)?;
    tokio::time::sleep(config.usb_reset_power_off).await;
    tokio::fs::write(&disable, b"0\n").await.map_err(fail)?;
    Ok(ResetOutcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A fake sysfs: class/tty/ttyUSB7 -> devices/.../usb1/1-2/1-2:1.0/ttyUSB7,
    /// with the USB port 1-2 having port/disable and bNumInterfaces.
    #[tokio::test]
    async fn usb_reset_writes_disable_then_enable() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path().join("sys");
        let port = sys.join("devices/pci0000:00/usb1/1-2");
        let tty = port.join("1-2:1.0/ttyUSB7");
        std::fs::create_dir_all(&tty).unwrap();
        std::fs::create_dir_all(port.join("port")).unwrap();
        std::fs::write(port.join("port/disable"), "0\n").unwrap();
        std::fs::write(port.join("bNumInterfaces"), " 1\n").unwrap();
        std::fs::create_dir_all(sys.join("class/tty")).unwrap();
        std::os::unix::fs::symlink(&tty, sys.join("class/tty/ttyUSB7")).unwrap();
        // The device node: any file named ttyUSB7.
        let dev = root.path().join("ttyUSB7");
        std::fs::write(&dev, "").unwrap();

        let config = SaladConfig {
            sysfs_root: sys.clone(),
            usb_reset_power_off: Duration::from_millis(10),
            ..SaladConfig::default()
        };
        let r = usb_reset(&config, &dev, "m").await.unwrap();
        assert_eq!(r, ResetOutcome::Done);
        assert_eq!(
            std::fs::read_to_string(port.join("port/disable")).unwrap(),
            "0\n"
        );

        let disabled = SaladConfig {
            usb_reset_disabled: true,
            ..config.clone()
        };
        let r = usb_reset(&disabled, &dev, "m").await.unwrap();
        assert!(
            matches!(r, ResetOutcome::Unsupported(m) if m.contains("disabled by the farm admin"))
        );

        std::fs::write(port.join("bNumInterfaces"), "2\n").unwrap();
        let r = usb_reset(&config, &dev, "m").await.unwrap();
        assert!(matches!(r, ResetOutcome::Unsupported(m) if m.contains("multi-interface")));

        std::fs::remove_file(port.join("port/disable")).unwrap();
        let r = usb_reset(&config, &dev, "m").await.unwrap();
        assert!(
            matches!(r, ResetOutcome::Unsupported(m) if m.contains("Per-Port Power Switching"))
        );

        // Not a USB device at all.
        let other = root.path().join("ttyS0");
        std::fs::write(&other, "").unwrap();
        let r = usb_reset(&config, &other, "m").await.unwrap();
        assert!(matches!(r, ResetOutcome::Unsupported(m) if m.contains("USB-based")));
    }
}
