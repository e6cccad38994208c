//! The kernel command line (`psyche-vmm --cmdline`): space-separated `key=value` words.

use psyche_abi::MAX_PROGRAMS;

use crate::quotas::QuotaSpec;

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
    /// `quota=realms=N,memory=SIZE,names=N` (any of the three): every program's share,
    /// instead of the fair default (`crate::quotas`).
    pub quota: QuotaSpec,
    /// `quota=K:realms=N,...`: program K's share, before `quota`'s.
    pub program_quota: [QuotaSpec; MAX_PROGRAMS],
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

/// A size: a number of bytes, or a number with a K, M, G or T suffix (powers of 1024).
fn size(text: &[u8]) -> Option<u64> {
    let (digits, shift) = match text.split_last() {
        Some((b'K', rest)) => (rest, 10),
        Some((b'M', rest)) => (rest, 20),
        Some((b'G', rest)) => (rest, 30),
        Some((b'T', rest)) => (rest, 40),
        _ => (text, 0),
    };
    let value = number(digits)?;
    (value.leading_zeros() >= shift).then(|| value << shift)
}

/// A `quota=` value: an optional `K:` (program K only), then `key=value` pairs separated by
/// commas, each of `realms`, `memory` and `names` at most once.
fn quota(value: &[u8], options: &mut Options) -> Option<()> {
    let (program, pairs) = match value.iter().position(|&b| b == b':') {
        Some(colon) => (Some(number(&value[..colon])?), &value[colon + 1..]),
        None => (None, value),
    };
    let mut spec = QuotaSpec::default();
    for pair in pairs.split(|&b| b == b',') {
        let equals = pair.iter().position(|&b| b == b'=')?;
        let (key, value) = (&pair[..equals], &pair[equals + 1..]);
        let slot = match key {
            b"realms" => &mut spec.realms,
            b"memory" => &mut spec.memory,
            b"names" => &mut spec.names,
            _ => return None,
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(if key == b"memory" { size(value)? } else { number(value)? });
    }
    let target = match program {
        Some(k) => options.program_quota.get_mut(usize::try_from(k).ok()?)?,
        None => &mut options.quota,
    };
    // A later word overrides what an earlier one set, and only that.
    target.realms = spec.realms.or(target.realms);
    target.memory = spec.memory.or(target.memory);
    target.names = spec.names.or(target.names);
    Some(())
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
            _ => {
                if let Some(value) = word.strip_prefix(b"quota=") {
                    quota(value, &mut options).ok_or(UnknownOption(word))?;
                    continue;
                }
                match word.strip_prefix(b"migrate=").and_then(number) {
                    Some(after) => options.migrate_after = Some(after),
                    None => return Err(UnknownOption(word)),
                }
            }
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
    fn quotas_for_all_and_for_one_program() {
        let options = parse(b"quota=realms=8,memory=4M quota=3:names=2,memory=12288 quota=names=5").unwrap();
        assert_eq!(options.quota, QuotaSpec { realms: Some(8), memory: Some(4 << 20), names: Some(5) });
        assert_eq!(options.program_quota[3], QuotaSpec { realms: None, memory: Some(12288), names: Some(2) });
        assert!(!options.program_quota[0].is_set());
        assert_eq!(parse(b"quota=memory=1G").unwrap().quota.memory, Some(1 << 30));
        assert_eq!(parse(b"quota=memory=0").unwrap().quota.memory, Some(0));
    }

    #[test]
    fn bad_quotas_are_reported() {
        for word in [
            &b"quota="[..],
            b"quota=realms",
            b"quota=realms=",
            b"quota=realms=x",
            b"quota=pages=4",
            b"quota=realms=1,realms=2",
            b"quota=memory=4Q",
            b"quota=memory=999999999999T",
            b"quota=16:realms=1",
            b"quota=:realms=1",
            b"quota=1:",
            b"quota=realms=1,",
        ] {
            assert_eq!(parse(word), Err(UnknownOption(word)), "{}", String::from_utf8_lossy(word));
        }
    }

    #[test]
    fn unknown_word_is_reported() {
        assert_eq!(parse(b"timer=off crash=boom"), Err(UnknownOption(b"crash=boom")));
    }
}
