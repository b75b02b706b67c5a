//! PII detection by hand-written scanners (no regex engine): e-mail addresses, phone numbers
//! (international `+…` and US formats), payment card numbers (13–19 digits, optional spaces
//! or dashes, Luhn check), IBANs (mod-97 check), US social security numbers (AAA-GG-SSSS
//! without the never-issued ranges) and IPv4/IPv6 addresses.
//!
//! Checksums keep the false positives down: a 16-digit number that fails Luhn is not a card,
//! and a number without separators or a leading `+` is never taken for a phone number. Spans
//! are byte offsets into the text, sorted and non-overlapping; where detectors overlap, the
//! more specific one wins (e-mail, IBAN, card, SSN, IP, phone).

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PiiKind {
    Email,
    Phone,
    Card,
    Iban,
    Ssn,
    Ip,
}

impl PiiKind {
    pub const ALL: [PiiKind; 6] = [PiiKind::Email, PiiKind::Phone, PiiKind::Card, PiiKind::Iban, PiiKind::Ssn, PiiKind::Ip];

    /// What redaction puts in place of a match.
    pub fn placeholder(self) -> &'static str {
        match self {
            PiiKind::Email => "[EMAIL]",
            PiiKind::Phone => "[PHONE]",
            PiiKind::Card => "[CARD]",
            PiiKind::Iban => "[IBAN]",
            PiiKind::Ssn => "[SSN]",
            PiiKind::Ip => "[IP]",
        }
    }
}

impl fmt::Display for PiiKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::Card => "card",
            PiiKind::Iban => "iban",
            PiiKind::Ssn => "ssn",
            PiiKind::Ip => "ip",
        })
    }
}

/// One detected span: `text[start..end]` (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PiiMatch {
    pub kind: PiiKind,
    pub start: usize,
    pub end: usize,
}

/// Every PII span in `text`, sorted by start, non-overlapping.
pub fn scan(text: &str) -> Vec<PiiMatch> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    // Fast exit: every detector needs a digit or an '@'.
    if !b.iter().any(|&c| c.is_ascii_digit() || c == b'@') {
        return out;
    }
    scan_emails(b, &mut out);
    scan_ibans(b, &mut out);
    out.sort_by_key(|m| m.start);
    let taken = out.clone();
    let mut next_taken = 0;
    let mut i = 0;
    while i < b.len() {
        while next_taken < taken.len() && taken[next_taken].end <= i {
            next_taken += 1;
        }
        if let Some(t) = taken.get(next_taken)
            && t.start <= i
        {
            i = t.end;
            continue;
        }
        let limit = taken.get(next_taken).map(|t| t.start).unwrap_or(b.len());
        if let Some((kind, end)) = numeric_at(b, i).filter(|&(_, e)| e <= limit) {
            out.push(PiiMatch { kind, start: i, end });
            i = end;
            continue;
        }
        i += 1;
    }
    out.sort_by_key(|m| m.start);
    out
}

/// `text` with every match replaced by its kind's placeholder.
pub fn redact(text: &str, matches: &[PiiMatch]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for m in matches {
        out.push_str(&text[at..m.start]);
        out.push_str(m.kind.placeholder());
        at = m.end;
    }
    out.push_str(&text[at..]);
    out
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

fn digit(b: &[u8], i: usize) -> bool {
    b.get(i).is_some_and(u8::is_ascii_digit)
}

/// May a number start at `i`? Not inside a word, nor continuing a number (`1.2`, `12-3`).
fn left_ok(b: &[u8], i: usize) -> bool {
    if i == 0 {
        return true;
    }
    let p = b[i - 1];
    if is_word(p) {
        return false;
    }
    !(matches!(p, b'.' | b'-' | b',' | b'/' | b':') && i >= 2 && b[i - 2].is_ascii_digit())
}

/// May a number end at `e`? Not inside a word, nor continued by `.5`, `-5`.
fn right_ok(b: &[u8], e: usize) -> bool {
    match b.get(e) {
        None => true,
        Some(&c) if is_word(c) => false,
        Some(&c) => !(matches!(c, b'.' | b'-' | b',' | b'/' | b':') && digit(b, e + 1)),
    }
}

/// Tries the numeric detectors at `i`, most specific first.
fn numeric_at(b: &[u8], i: usize) -> Option<(PiiKind, usize)> {
    let c = b[i];
    if !(c.is_ascii_digit() || c == b'+' || c == b'(' || c.is_ascii_hexdigit() || c == b':') {
        return None;
    }
    if !left_ok(b, i) {
        return None;
    }
    if c.is_ascii_digit() {
        // Card groups are separated by spaces or dashes, so a card does not continue a
        // number before it (e.g. the digit groups of an IBAN that failed its checksum).
        let continues = i >= 2 && matches!(b[i - 1], b' ' | b'-') && b[i - 2].is_ascii_digit();
        if !continues && let Some(e) = card_at(b, i) {
            return Some((PiiKind::Card, e));
        }
        if let Some(e) = ssn_at(b, i) {
            return Some((PiiKind::Ssn, e));
        }
        if let Some(e) = ipv4_at(b, i) {
            return Some((PiiKind::Ip, e));
        }
    }
    if let Some(e) = ipv6_at(b, i) {
        return Some((PiiKind::Ip, e));
    }
    if (c.is_ascii_digit() || c == b'(')
        && let Some(e) = us_phone_at(b, i)
    {
        return Some((PiiKind::Phone, e));
    }
    if c == b'+'
        && let Some(e) = intl_phone_at(b, i)
    {
        return Some((PiiKind::Phone, e));
    }
    None
}

fn digits_run(b: &[u8], i: usize) -> usize {
    b[i..].iter().take_while(|c| c.is_ascii_digit()).count()
}

/// The Luhn checksum over ASCII digits.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (k, &d) in digits.iter().rev().enumerate() {
        let mut v = (d - b'0') as u32;
        if k % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// 13–19 digits in groups separated by single spaces or dashes, passing Luhn; the longest
/// such prefix of the run of groups.
fn card_at(b: &[u8], i: usize) -> Option<usize> {
    let mut digits: Vec<u8> = Vec::with_capacity(19);
    let mut ends: Vec<(usize, usize)> = Vec::new(); // (end, digit count) at group ends
    let mut j = i;
    loop {
        let n = digits_run(b, j);
        if n == 0 {
            break;
        }
        digits.extend_from_slice(&b[j..j + n]);
        j += n;
        ends.push((j, digits.len()));
        if digits.len() > 19 {
            break;
        }
        if matches!(b.get(j), Some(b' ' | b'-')) && digit(b, j + 1) {
            j += 1;
        } else {
            break;
        }
    }
    ends.iter().rev().find_map(|&(end, count)| {
        ((13..=19).contains(&count) && right_ok(b, end) && luhn_valid(&digits[..count])).then_some(end)
    })
}

/// Whether a US SSN's parts are in issued ranges: area not 000, 666 or 900–999; group not
/// 00; serial not 0000.
pub fn ssn_valid(area: u32, group: u32, serial: u32) -> bool {
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn num(b: &[u8]) -> u32 {
    b.iter().fold(0, |acc, &c| acc * 10 + (c - b'0') as u32)
}

fn ssn_at(b: &[u8], i: usize) -> Option<usize> {
    let shape = |k: usize, d: bool| if d { digit(b, i + k) } else { b.get(i + k) == Some(&b'-') };
    let pattern = [true, true, true, false, true, true, false, true, true, true, true];
    if !pattern.iter().enumerate().all(|(k, &d)| shape(k, d)) || !right_ok(b, i + 11) {
        return None;
    }
    ssn_valid(num(&b[i..i + 3]), num(&b[i + 4..i + 6]), num(&b[i + 7..i + 11])).then_some(i + 11)
}

fn ipv4_at(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i;
    for part in 0..4 {
        let n = digits_run(b, j);
        if n == 0 || n > 3 || (n > 1 && b[j] == b'0') || num(&b[j..j + n]) > 255 {
            return None;
        }
        j += n;
        if part < 3 {
            if b.get(j) != Some(&b'.') {
                return None;
            }
            j += 1;
        }
    }
    right_ok(b, j).then_some(j)
}

fn ipv6_at(b: &[u8], i: usize) -> Option<usize> {
    let len = b[i..].iter().take_while(|&&c| c.is_ascii_hexdigit() || c == b':' || c == b'.').count();
    let mut cand = &b[i..i + len];
    while let Some(rest) = cand.strip_suffix(b".") {
        cand = rest;
    }
    if cand.ends_with(b":") && !cand.ends_with(b"::") {
        cand = &cand[..cand.len() - 1];
    }
    let colons = cand.iter().filter(|&&c| c == b':').count();
    let has_gap = cand.windows(2).any(|w| w == b"::");
    if colons < 2 || !(has_gap || colons == 7) || !cand.iter().any(u8::is_ascii_digit) {
        return None;
    }
    let groups = cand.split(|&c| c == b':').filter(|g| !g.is_empty()).count();
    if groups < 2 {
        return None;
    }
    let end = i + cand.len();
    if b.get(end).is_some_and(|&c| is_word(c)) {
        return None;
    }
    let s = std::str::from_utf8(cand).ok()?;
    s.parse::<std::net::Ipv6Addr>().ok().map(|_| end)
}

/// `(415) 555-2671`, `415-555-2671`, `415.555.2671`, `415 555 2671`, optionally after
/// `1-`/`1 `/`1.`; area code and exchange start with 2–9.
fn us_phone_at(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i;
    if b.get(j) == Some(&b'1') && matches!(b.get(j + 1), Some(b'-' | b' ' | b'.')) && matches!(b.get(j + 2), Some(b'(' | b'0'..=b'9'))
    {
        j += 2;
    }
    let three = |k: usize| digits_run(b, k) == 3;
    let sep;
    if b.get(j) == Some(&b'(') {
        if !(three(j + 1) && b.get(j + 4) == Some(&b')')) {
            return None;
        }
        if b[j + 1] < b'2' {
            return None;
        }
        j += 5;
        if matches!(b.get(j), Some(b' ' | b'-')) {
            j += 1;
        }
        sep = None;
    } else {
        if !three(j) || b[j] < b'2' {
            return None;
        }
        j += 3;
        let s = *b.get(j)?;
        if !matches!(s, b'-' | b'.' | b' ') {
            return None;
        }
        sep = Some(s);
        j += 1;
    }
    if !three(j) || b[j] < b'2' {
        return None;
    }
    j += 3;
    let s2 = *b.get(j)?;
    match sep {
        Some(s) if s != s2 => return None,
        None if !matches!(s2, b'-' | b'.' | b' ') => return None,
        _ => {}
    }
    j += 1;
    if digits_run(b, j) != 4 {
        return None;
    }
    j += 4;
    right_ok(b, j).then_some(j)
}

/// `+` then 8–15 digits with single spaces, dashes, dots or parentheses between them.
fn intl_phone_at(b: &[u8], i: usize) -> Option<usize> {
    if !digit(b, i + 1) {
        return None;
    }
    let mut j = i + 1;
    let mut digits = 0;
    let mut last_digit_end = j;
    let mut seps = 0;
    while let Some(&c) = b.get(j) {
        if c.is_ascii_digit() {
            digits += 1;
            seps = 0;
            last_digit_end = j + 1;
        } else if matches!(c, b' ' | b'-' | b'.' | b'(' | b')') {
            seps += 1;
            if seps > 2 {
                break;
            }
        } else {
            break;
        }
        if digits > 15 {
            return None;
        }
        j += 1;
    }
    let end = last_digit_end;
    // Parentheses must pair up inside the number.
    let text = &b[i..end];
    if text.iter().filter(|&&c| c == b'(').count() != text.iter().filter(|&&c| c == b')').count() {
        return None;
    }
    if !(8..=15).contains(&digits) || !right_ok(b, end) {
        return None;
    }
    Some(end)
}

fn scan_emails(b: &[u8], out: &mut Vec<PiiMatch>) {
    let local = |c: u8| c.is_ascii_alphanumeric() || b"._%+-".contains(&c);
    let domain = |c: u8| c.is_ascii_alphanumeric() || c == b'.' || c == b'-';
    let mut from = 0;
    for at in 0..b.len() {
        if b[at] != b'@' || at < from {
            continue;
        }
        let mut s = at;
        while s > from && local(b[s - 1]) {
            s -= 1;
        }
        while s < at && b[s] == b'.' {
            s += 1;
        }
        if s == at || (s > 0 && b[s - 1] >= 0x80) {
            continue;
        }
        let mut e = at + 1;
        while e < b.len() && domain(b[e]) {
            e += 1;
        }
        while e > at + 1 && matches!(b[e - 1], b'.' | b'-') {
            e -= 1;
        }
        let dom = &b[at + 1..e];
        let labels: Vec<&[u8]> = dom.split(|&c| c == b'.').collect();
        let tld = labels.last().copied().unwrap_or_default();
        let ok = labels.len() >= 2
            && labels.iter().all(|l| !l.is_empty() && l[0] != b'-' && l[l.len() - 1] != b'-')
            && tld.len() >= 2
            && tld.iter().all(u8::is_ascii_alphabetic)
            && !b.get(e).is_some_and(|&c| c >= 0x80 || c == b'_');
        if ok {
            out.push(PiiMatch { kind: PiiKind::Email, start: s, end: e });
            from = e;
        }
    }
}

/// The IBAN checksum: the first four characters moved to the end, letters as 10–35, the
/// number mod 97 must be 1. `s` holds only upper-case letters and digits.
pub fn iban_valid(s: &[u8]) -> bool {
    if !(15..=34).contains(&s.len())
        || !s[..2].iter().all(u8::is_ascii_uppercase)
        || !s[2..4].iter().all(u8::is_ascii_digit)
        || !s.iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    {
        return false;
    }
    let mut r: u32 = 0;
    for &c in s[4..].iter().chain(&s[..4]) {
        r = if c.is_ascii_digit() { (r * 10 + (c - b'0') as u32) % 97 } else { (r * 100 + (c - b'A' + 10) as u32) % 97 };
    }
    r == 1
}

fn scan_ibans(b: &[u8], out: &mut Vec<PiiMatch>) {
    let alnum = |c: u8| c.is_ascii_uppercase() || c.is_ascii_digit();
    let mut i = 0;
    while i + 4 <= b.len() {
        let starts = b[i].is_ascii_uppercase()
            && b[i + 1].is_ascii_uppercase()
            && b[i + 2].is_ascii_digit()
            && b[i + 3].is_ascii_digit()
            && (i == 0 || !is_word(b[i - 1]));
        if !starts {
            i += 1;
            continue;
        }
        let mut chars: Vec<u8> = Vec::with_capacity(34);
        let mut ends: Vec<(usize, usize)> = Vec::new();
        let mut j = i;
        while j < b.len() && chars.len() <= 34 {
            if alnum(b[j]) {
                chars.push(b[j]);
                j += 1;
            } else if b[j] == b' ' && b.get(j + 1).is_some_and(|&c| alnum(c)) {
                ends.push((j, chars.len()));
                j += 1;
            } else {
                break;
            }
        }
        ends.push((j, chars.len()));
        let found = ends.iter().rev().find(|&&(end, n)| {
            !b.get(end).is_some_and(|&c| is_word(c)) && n <= chars.len() && iban_valid(&chars[..n])
        });
        match found {
            Some(&(end, _)) => {
                out.push(PiiMatch { kind: PiiKind::Iban, start: i, end });
                i = end;
            }
            None => i += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<(PiiKind, &str)> {
        scan(text).into_iter().map(|m| (m.kind, &text[m.start..m.end])).collect()
    }

    #[test]
    fn luhn_and_iban_checksums() {
        assert!(luhn_valid(b"4111111111111111"));
        assert!(!luhn_valid(b"4111111111111112"));
        assert!(iban_valid(b"DE89370400440532013000"));
        assert!(iban_valid(b"GB82WEST12345698765432"));
        assert!(!iban_valid(b"DE89370400440532013001"));
        assert!(ssn_valid(123, 45, 6789));
        assert!(!ssn_valid(0, 45, 6789));
        assert!(!ssn_valid(666, 45, 6789));
        assert!(!ssn_valid(912, 45, 6789));
        assert!(!ssn_valid(123, 0, 6789));
        assert!(!ssn_valid(123, 45, 0));
    }

    #[test]
    fn finds_each_kind() {
        assert_eq!(kinds("mail jane.doe+x@mail.example.co.uk."), vec![(PiiKind::Email, "jane.doe+x@mail.example.co.uk")]);
        assert_eq!(kinds("card 4111 1111 1111 1111 exp"), vec![(PiiKind::Card, "4111 1111 1111 1111")]);
        assert_eq!(kinds("card 4111-1111-1111-1111"), vec![(PiiKind::Card, "4111-1111-1111-1111")]);
        assert_eq!(kinds("amex 378282246310005"), vec![(PiiKind::Card, "378282246310005")]);
        assert_eq!(kinds("iban DE89 3704 0044 0532 0130 00 ok"), vec![(PiiKind::Iban, "DE89 3704 0044 0532 0130 00")]);
        assert_eq!(kinds("ssn 123-45-6789."), vec![(PiiKind::Ssn, "123-45-6789")]);
        assert_eq!(kinds("from 192.168.1.20, to"), vec![(PiiKind::Ip, "192.168.1.20")]);
        assert_eq!(kinds("v6 2001:db8::8a2e:370:7334 here"), vec![(PiiKind::Ip, "2001:db8::8a2e:370:7334")]);
        assert_eq!(kinds("call (415) 555-2671 now"), vec![(PiiKind::Phone, "(415) 555-2671")]);
        assert_eq!(kinds("call 415-555-2671"), vec![(PiiKind::Phone, "415-555-2671")]);
        assert_eq!(kinds("call 1-800-555-0199"), vec![(PiiKind::Phone, "1-800-555-0199")]);
        assert_eq!(kinds("ruf +49 30 901820 an"), vec![(PiiKind::Phone, "+49 30 901820")]);
        assert_eq!(kinds("tel +44 (20) 7946-0958."), vec![(PiiKind::Phone, "+44 (20) 7946-0958")]);
    }

    #[test]
    fn near_misses_are_not_pii() {
        // Luhn fails.
        assert!(kinds("order 4111 1111 1111 1112").is_empty());
        assert!(kinds("id 1234567890123456").is_empty());
        // Checksum fails.
        assert_eq!(kinds("iban DE89 3704 0044 0532 0130 01"), vec![]);
        // Never-issued SSN ranges.
        assert!(kinds("ssn 000-12-3456").is_empty());
        assert!(kinds("ssn 666-12-3456 and 923-12-3456").is_empty());
        // Plain long numbers, versions, times, dates, code.
        assert!(kinds("tracking 5551234567").is_empty());
        assert!(kinds("version 1.2.3.4.5 and 256.1.1.1").is_empty());
        assert!(kinds("at 10:30:00 on 2024-01-31").is_empty());
        assert!(kinds("use std::vec::Vec; a::b").is_empty());
        assert!(kinds("user@localhost and @handle").is_empty());
        assert!(kinds("price 12.50, qty 3").is_empty());
    }

    #[test]
    fn redaction_replaces_spans() {
        let text = "write to bob@example.com or call 415.555.2671, card 4111111111111111";
        let red = redact(text, &scan(text));
        assert_eq!(red, "write to [EMAIL] or call [PHONE], card [CARD]");
    }
}
