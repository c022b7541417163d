//! Port states and port descriptions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::PduError;

/// The state of a PDU port.
///
/// The integer values are those of the reference implementation
/// (`UNKNOWN=0, OFF=1, ON=2, REBOOT=3`); the JSON form is the upper-case
/// name (`"ON"`). UNKNOWN is never a valid action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum PortState {
    /// The state could not be read (or was never read).
    #[default]
    Unknown = 0,
    /// The port delivers no power.
    Off = 1,
    /// The port delivers power.
    On = 2,
    /// The port is being power-cycled (as an action: power-cycle it).
    Reboot = 3,
}

impl PortState {
    /// The reference integer value of the state.
    pub fn as_int(self) -> u8 {
        self as u8
    }

    /// The state for a reference integer value, if it is one.
    pub fn from_int(value: i64) -> Option<Self> {
        match value {
            0 => Some(Self::Unknown),
            1 => Some(Self::Off),
            2 => Some(Self::On),
            3 => Some(Self::Reboot),
            _ => None,
        }
    }

    /// The upper-case name (`"ON"`, `"OFF"`, `"REBOOT"`, `"UNKNOWN"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "UNKNOWN",
            Self::Off => "OFF",
            Self::On => "ON",
            Self::Reboot => "REBOOT",
        }
    }

    /// Whether the state can be requested (ON, OFF, REBOOT).
    pub fn is_action(self) -> bool {
        self != Self::Unknown
    }
}

impl fmt::Display for PortState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PortState {
    type Err = PduError;

    /// Parses a state name, case-insensitively (`"on"`, `"Off"`, `"REBOOT"`,
    /// `"unknown"`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "ON" => Ok(Self::On),
            "OFF" => Ok(Self::Off),
            "REBOOT" => Ok(Self::Reboot),
            "UNKNOWN" => Ok(Self::Unknown),
            _ => Err(PduError::InvalidState(format!(
                "\"{s}\" is not a port state (expected ON, OFF or REBOOT)"
            ))),
        }
    }
}

/// A port as listed by a driver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    /// The port id, always compared as a string (`"0"`, `"8"`).
    pub id: String,
    /// The label the PDU gives the port, if it has labels.
    pub label: Option<String>,
}

impl PortInfo {
    /// A port with an id and an optional label.
    pub fn new(id: impl Into<String>, label: Option<String>) -> Self {
        Self {
            id: id.into(),
            label,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_parse_case_insensitively_and_serialise_upper_case() {
        assert_eq!("on".parse::<PortState>().unwrap(), PortState::On);
        assert_eq!("Off".parse::<PortState>().unwrap(), PortState::Off);
        assert_eq!("REBOOT".parse::<PortState>().unwrap(), PortState::Reboot);
        let err = "up".parse::<PortState>().unwrap_err().to_string();
        assert!(err.contains("\"up\""), "{err}");
        assert_eq!(serde_json::to_string(&PortState::On).unwrap(), "\"ON\"");
        assert_eq!(
            serde_json::from_str::<PortState>("\"UNKNOWN\"").unwrap(),
            PortState::Unknown
        );
    }

    #[test]
    fn integer_values_follow_the_reference() {
        for (i, s) in [
            (0, PortState::Unknown),
            (1, PortState::Off),
            (2, PortState::On),
            (3, PortState::Reboot),
        ] {
            assert_eq!(PortState::from_int(i), Some(s));
            assert_eq!(s.as_int() as i64, i);
        }
        assert_eq!(PortState::from_int(4), None);
        assert!(!PortState::Unknown.is_action());
    }
}
