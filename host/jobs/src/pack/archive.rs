//! The container of a `.lathepack`: a POSIX ustar archive in one canonical form (members
//! in a fixed order, mode 0644, owner 0, time 0, no user or group names), so the same
//! contents always give the same bytes and the same sha256. `tar tf` lists it.
//!
//! [`read`] accepts only that form: it parses the members and writes them back, and the
//! bytes must come out identical. A change anywhere (a header, a member's bytes, the
//! padding, the end blocks) is refused, not silently read.

use crate::error::{JobError, Result};

const BLOCK: usize = 512;
/// The longest member name a plain ustar header holds (no prefix field, no extensions).
pub const MAX_NAME: usize = 100;

/// One file in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Writes `members` in the given order.
pub fn write(members: &[Member]) -> Result<Vec<u8>> {
    let total: usize = members.iter().map(|m| BLOCK + m.bytes.len().div_ceil(BLOCK) * BLOCK).sum();
    let mut out = Vec::with_capacity(total + 2 * BLOCK);
    for m in members {
        out.extend_from_slice(&header(&m.name, m.bytes.len())?);
        out.extend_from_slice(&m.bytes);
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    }
    out.resize(out.len() + 2 * BLOCK, 0);
    Ok(out)
}

/// Reads an archive that [`write`] wrote, member by member.
pub fn read(bytes: &[u8]) -> Result<Vec<Member>> {
    let bad = |at: usize, why: String| Err(JobError::Invalid(format!("not a Lathe pack: at byte {at}: {why}")));
    if !bytes.len().is_multiple_of(BLOCK) || bytes.len() < 2 * BLOCK {
        return bad(0, format!("{} bytes is not a whole number of 512-byte tar blocks", bytes.len()));
    }
    let mut members = Vec::new();
    let mut at = 0;
    while at + BLOCK <= bytes.len() {
        let h = &bytes[at..at + BLOCK];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let name_len = h[..MAX_NAME].iter().position(|&b| b == 0).unwrap_or(MAX_NAME);
        let Ok(name) = std::str::from_utf8(&h[..name_len]) else {
            return bad(at, "a member name that is not UTF-8".into());
        };
        let size = match octal(&h[124..136]) {
            Some(s) => s as usize,
            None => return bad(at, format!("member `{name}`: an unreadable size field")),
        };
        let data = at + BLOCK;
        if data + size > bytes.len() {
            return bad(at, format!("member `{name}` claims {size} bytes, past the end of the file"));
        }
        members.push(Member { name: name.to_string(), bytes: bytes[data..data + size].to_vec() });
        at = data + size.div_ceil(BLOCK) * BLOCK;
    }
    // The canonical form, written back, must be these very bytes.
    let again = write(&members)?;
    if let Some(i) = again.iter().zip(bytes).position(|(a, b)| a != b) {
        return bad(i, "the archive differs from its canonical form (changed or not written by `lathe pack build`)".into());
    }
    if again.len() != bytes.len() {
        return bad(again.len().min(bytes.len()), format!("{} bytes where the canonical form has {}", bytes.len(), again.len()));
    }
    Ok(members)
}

fn header(name: &str, size: usize) -> Result<[u8; BLOCK]> {
    if name.is_empty() || name.len() > MAX_NAME || !name.is_ascii() || name.starts_with('/') || name.split('/').any(|c| c == ".." || c.is_empty()) {
        return Err(JobError::Invalid(format!("`{name}` cannot be a pack member: ASCII, relative, at most {MAX_NAME} bytes")));
    }
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    put_octal(&mut h[100..108], 0o644);
    put_octal(&mut h[108..116], 0);
    put_octal(&mut h[116..124], 0);
    put_octal(&mut h[124..136], size as u64);
    put_octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is the byte sum with its own field read as spaces.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put_octal(&mut h[148..155], u64::from(sum));
    h[155] = b' ';
    Ok(h)
}

/// Zero-padded octal digits then NUL, filling `field`.
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

fn octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?.trim_matches(|c| c == '\0' || c == ' ');
    u64::from_str_radix(s, 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Member> {
        vec![
            Member { name: "pack.toml".into(), bytes: b"name = \"x\"\n".to_vec() },
            Member { name: "data/items.jsonl".into(), bytes: vec![7u8; 1300] },
            Member { name: "empty".into(), bytes: vec![] },
        ]
    }

    #[test]
    fn what_is_written_reads_back() {
        let bytes = write(&sample()).unwrap();
        assert_eq!(bytes.len() % 512, 0);
        assert_eq!(read(&bytes).unwrap(), sample());
        assert_eq!(write(&sample()).unwrap(), bytes, "the same members give the same bytes");
    }

    /// Outside the members' own bytes (which the pack's manifest hashes), any change is
    /// refused: headers, padding, the end blocks.
    #[test]
    fn a_change_outside_the_members_bytes_is_refused() {
        let members = sample();
        let bytes = write(&members).unwrap();
        let mut data = Vec::new();
        let mut at = 0;
        for m in &members {
            data.push(at + 512..at + 512 + m.bytes.len());
            at += 512 + m.bytes.len().div_ceil(512) * 512;
        }
        for i in (0..bytes.len()).filter(|i| !data.iter().any(|r| r.contains(i))) {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(read(&t).is_err(), "flipping a bit of byte {i} was not noticed");
        }
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 512]);
        assert!(read(&longer).is_err(), "an extra end block was not noticed");
    }

    #[test]
    fn names_that_could_escape_are_refused() {
        for name in ["../x", "/etc/passwd", "a//b", "", &"n".repeat(101)] {
            assert!(write(&[Member { name: name.into(), bytes: vec![] }]).is_err(), "{name:?}");
        }
    }
}
