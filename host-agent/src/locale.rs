//! ASCII output under a locale that is not UTF-8. vmplug's text says `→`, `×`,
//! `–`, `…`; a terminal in the C locale shows those as mojibake. The locale is
//! decided as the C library does: the first of `LC_ALL`, `LC_CTYPE` and `LANG`
//! that is set and not empty; none, `C`, `POSIX`, or a locale without a UTF-8
//! codeset (`en_US`, `de_DE.ISO-8859-1`) means ASCII. JSON output stays UTF-8
//! (JSON text is UTF-8 by definition).

use std::borrow::Cow;

/// Whether the locale the environment selects has a UTF-8 codeset; `var`
/// reads the environment (injected, so tests need not change the process's).
pub fn is_utf8(var: impl Fn(&str) -> Option<String>) -> bool {
    let Some(locale) = ["LC_ALL", "LC_CTYPE", "LANG"].into_iter().find_map(|k| var(k).filter(|v| !v.is_empty())) else {
        return false;
    };
    // language[_territory][.codeset][@modifier]
    let codeset = locale.split('@').next().unwrap_or("").split_once('.').map(|(_, c)| c.to_ascii_lowercase());
    matches!(codeset.as_deref(), Some("utf-8" | "utf8"))
}

/// Whether this process's locale is UTF-8.
pub fn process_is_utf8() -> bool {
    is_utf8(|k| std::env::var(k).ok())
}

/// The ASCII stand-in of a character vmplug prints; None for one it has none
/// for (then `?`, as the C library's conversions write).
fn stand_in(c: char) -> Option<&'static str> {
    Some(match c {
        '→' => "->",
        '←' => "<-",
        '↔' => "<->",
        '×' => "x",
        '–' | '−' | '‐' => "-",
        '—' => "--",
        '…' => "...",
        '≥' => ">=",
        '≤' => "<=",
        '≠' => "!=",
        'µ' => "u",
        '§' => "S",
        '·' | '•' => "*",
        '‘' | '’' => "'",
        '“' | '”' => "\"",
        '\u{a0}' => " ",
        _ => return None,
    })
}

/// `text` in ASCII: each character vmplug uses by its stand-in, any other
/// non-ASCII character (a domain's name in Unicode) as `?`.
pub fn ascii(text: &str) -> Cow<'_, str> {
    if text.is_ascii() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            c if c.is_ascii() => out.push(c),
            c => out.push_str(stand_in(c).unwrap_or("?")),
        }
    }
    Cow::Owned(out)
}

/// `text` as this process's locale can show it.
pub fn for_terminal(text: &str) -> Cow<'_, str> {
    if process_is_utf8() {
        Cow::Borrowed(text)
    } else {
        ascii(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn lc_all_then_lc_ctype_then_lang_decides() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[], false),
            (&[("LANG", "C.UTF-8")], true),
            (&[("LANG", "en_US.utf8")], true),
            (&[("LANG", "de_DE.UTF-8@euro")], true),
            (&[("LANG", "C")], false),
            (&[("LANG", "POSIX")], false),
            (&[("LANG", "en_US")], false),
            (&[("LANG", "de_DE.ISO-8859-1")], false),
            (&[("LC_ALL", "C"), ("LANG", "en_US.UTF-8")], false),
            (&[("LC_ALL", "C.UTF-8"), ("LC_CTYPE", "C")], true),
            (&[("LC_CTYPE", "POSIX"), ("LANG", "C.UTF-8")], false),
            (&[("LC_CTYPE", "en_GB.UTF-8"), ("LANG", "C")], true),
            // Set but empty counts as unset, as in the C library.
            (&[("LC_ALL", ""), ("LC_CTYPE", ""), ("LANG", "C.UTF-8")], true),
            (&[("LC_ALL", ""), ("LANG", "")], false),
        ];
        for (vars, utf8) in cases {
            assert_eq!(is_utf8(env(vars)), *utf8, "{vars:?}");
        }
    }

    #[test]
    fn every_character_vmplug_prints_has_an_ascii_stand_in() {
        assert_eq!(ascii("2 → 4 vCPUs, 2 × 512 MiB – done…"), "2 -> 4 vCPUs, 2 x 512 MiB - done...");
        assert_eq!(ascii("≥ 1 — µs ↔ −1"), ">= 1 -- us <-> -1");
        assert_eq!(ascii("web-区-ü"), "web-?-?");
        assert!(matches!(ascii("plain"), Cow::Borrowed("plain")));
    }
}
