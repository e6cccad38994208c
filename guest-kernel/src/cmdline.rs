//! The kernel command line (`psyche-vmm --cmdline`): space-separated `key=value` words.

/// A deliberate kernel crash, used to test that psyche-vmm reports one properly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashTest {
    /// Touch an unmapped address at CPL0 (a #PF the kernel cannot handle).
    PageFault,
    /// Execute `ud2` at CPL0.
    InvalidOpcode,
    /// Load an empty IDT and trap: the CPU shuts down (triple fault).
    TripleFault,
    /// A Rust panic in the kernel.
    Panic,
}

impl CrashTest {
    /// The option value that selects it.
    pub fn name(self) -> &'static str {
        match self {
            Self::PageFault => "page-fault",
            Self::InvalidOpcode => "invalid-opcode",
            Self::TripleFault => "triple-fault",
            Self::Panic => "panic",
        }
    }
}

/// What the kernel understood of its command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `crash=page-fault|invalid-opcode|triple-fault|panic`.
    pub crash: Option<CrashTest>,
    /// `timer=off` skips the LAPIC timer check at boot.
    pub skip_timer_check: bool,
    /// `migrate=N` moves a realm to a node once N of its latency traps came from there;
    /// `migrate=off` never moves one. `None`: the default, [`DEFAULT_MIGRATE_AFTER`].
    pub migrate_after: Option<u64>,
}

/// Latency traps from one node after which a realm moves there, unless `migrate=` says
/// otherwise.
pub const DEFAULT_MIGRATE_AFTER: u64 = 64;

fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    digits.iter().try_fold(0u64, |value, &digit| digit.is_ascii_digit().then(|| value * 10 + u64::from(digit - b'0')))
}

/// A word of the command line the kernel does not understand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownOption<'a>(pub &'a [u8]);

/// Parses the command line. Unknown words are returned so the kernel can say so and stop:
/// a typo should not silently boot a different configuration.
pub fn parse(line: &[u8]) -> Result<Options, UnknownOption<'_>> {
    let mut options = Options::default();
    for word in line.split(|&b| b == b' ').filter(|w| !w.is_empty()) {
        match word {
            b"crash=page-fault" => options.crash = Some(CrashTest::PageFault),
            b"crash=invalid-opcode" => options.crash = Some(CrashTest::InvalidOpcode),
            b"crash=triple-fault" => options.crash = Some(CrashTest::TripleFault),
            b"crash=panic" => options.crash = Some(CrashTest::Panic),
            b"timer=off" => options.skip_timer_check = true,
            b"timer=on" => options.skip_timer_check = false,
            b"migrate=off" => options.migrate_after = Some(0),
            _ => match word.strip_prefix(b"migrate=").and_then(number) {
                Some(after) => options.migrate_after = Some(after),
                None => return Err(UnknownOption(word)),
            },
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_line_gives_defaults() {
        assert_eq!(parse(b""), Ok(Options::default()));
        assert_eq!(parse(b"   "), Ok(Options::default()));
    }

    #[test]
    fn known_words() {
        let options = parse(b"crash=triple-fault  timer=off").unwrap();
        assert_eq!(options.crash, Some(CrashTest::TripleFault));
        assert!(options.skip_timer_check);
    }

    #[test]
    fn migration_threshold() {
        assert_eq!(parse(b"migrate=off").unwrap().migrate_after, Some(0));
        assert_eq!(parse(b"migrate=128").unwrap().migrate_after, Some(128));
        assert_eq!(parse(b"").unwrap().migrate_after, None);
        assert_eq!(parse(b"migrate=12x"), Err(UnknownOption(b"migrate=12x")));
        assert_eq!(parse(b"migrate="), Err(UnknownOption(b"migrate=")));
    }

    #[test]
    fn unknown_word_is_reported() {
        assert_eq!(parse(b"timer=off crash=boom"), Err(UnknownOption(b"crash=boom")));
    }
}
