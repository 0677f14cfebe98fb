//! Error messages about a config file that point at the line and key but never repeat a
//! value: an operator may have pasted a secret anywhere.

/// The 1-based line and column of byte `offset` in `text`.
pub(super) fn position(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    (line, offset - start + 1)
}

/// The dotted name of the key whose line holds `offset` (`server.header_read_timeout`), if
/// that line is `key = value`. Key names are safe to show; values are not.
pub(super) fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |p| p + 1);
    let line = text[start..].lines().next().unwrap_or_default();
    let key = line.split_once('=')?.0.trim();
    let bare = |k: &str| {
        !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    if !bare(key) {
        return None;
    }
    let section = text[..start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.starts_with('[')
            .then(|| l.trim_matches(['[', ']', ' ']).to_owned())
    });
    match section {
        Some(section) if bare(&section) => Some(format!("{section}.{key}")),
        _ => Some(key.to_owned()),
    }
}

/// `text` with the line holding `offset` commented out, if what remains is still TOML and
/// still has its sections (a table header set aside would move its keys elsewhere).
pub(super) fn set_line_aside(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |p| p + 1);
    let end = text[start..].find('\n').map_or(text.len(), |p| start + p);
    let line = text[start..end].trim_start();
    if line.starts_with('[') || line.starts_with('#') || line.is_empty() {
        return None;
    }
    let next = format!("{}#{}", &text[..start], &text[start..]);
    next.parse::<toml::Table>().is_ok().then_some(next)
}

/// Takes every value out of a TOML or serde message, keeping key names (after "field" or
/// "key"), numbers and the expected alternatives (after "expected": they come from the
/// types, not from the file). `raw` is the offending source text, removed wherever it still
/// appears.
pub(super) fn redact(message: &str, raw: &str) -> String {
    let keeps_names = [
        "unknown field",
        "missing field",
        "duplicate key",
        "duplicate field",
    ]
    .iter()
    .any(|p| message.starts_with(p));
    let (head, tail) = match message.find("expected") {
        Some(i) if !keeps_names => message.split_at(i),
        _ => (message, ""),
    };
    let mut out = String::with_capacity(message.len());
    if keeps_names {
        out.push_str(head);
    } else {
        let mut quote: Option<char> = None;
        for c in head.chars() {
            match quote {
                Some(q) if c == q => {
                    quote = None;
                    out.push_str("<redacted>");
                }
                Some(_) => {}
                None if c == '"' || c == '`' || c == '\'' => quote = Some(c),
                None => out.push(c),
            }
        }
        if quote.is_some() {
            out.push_str("<redacted>");
        }
    }
    out.push_str(tail);
    let raw = raw.trim().trim_matches(['"', '\'']);
    if raw.len() >= 3 && !keeps_names {
        out = out.replace(raw, "<redacted>");
    }
    out
}
