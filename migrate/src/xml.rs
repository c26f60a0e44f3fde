//! Just enough XML for `.vmc` files: text decoding (UTF-16 LE/BE with or without BOM, UTF-8)
//! and a non-validating element tree (elements, attributes, text, comments, CDATA, processing
//! instructions, a DOCTYPE without internal subset, the predefined and numeric entities).
//!
//! The parser is iterative (no recursion), so a hostile file cannot overflow the stack; depth
//! is still capped because a `.vmc` is a few levels deep.

/// Why a `.vmc` is not readable XML.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("not valid UTF-8 at byte {0}")]
    Utf8(usize),
    #[error("{} text has an odd number of bytes", .0.name())]
    OddLength(TextEncoding),
    #[error("not valid {} (unpaired surrogate)", .0.name())]
    UnpairedSurrogate(TextEncoding),
    #[error("XML error at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("unexpected end of document: <{0}> is not closed")]
    Unclosed(String),
    #[error("no root element")]
    NoRoot,
}

type Result<T> = std::result::Result<T, XmlError>;

/// Deepest nesting accepted.
const MAX_DEPTH: usize = 256;

/// How the bytes were encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum TextEncoding {
    #[serde(rename = "UTF-8")]
    Utf8,
    #[serde(rename = "UTF-16LE")]
    Utf16Le,
    #[serde(rename = "UTF-16BE")]
    Utf16Be,
}

impl TextEncoding {
    pub fn name(self) -> &'static str {
        match self {
            TextEncoding::Utf8 => "UTF-8",
            TextEncoding::Utf16Le => "UTF-16LE",
            TextEncoding::Utf16Be => "UTF-16BE",
        }
    }
}

/// Decodes a `.vmc`: a BOM decides; without one, a `<` followed or preceded by a NUL byte
/// means UTF-16 (Virtual PC always writes a BOM, hand-edited copies may lose it); else UTF-8.
pub fn decode(bytes: &[u8]) -> Result<(String, TextEncoding)> {
    let (enc, body) = match bytes {
        [0xEF, 0xBB, 0xBF, rest @ ..] => (TextEncoding::Utf8, rest),
        [0xFF, 0xFE, rest @ ..] => (TextEncoding::Utf16Le, rest),
        [0xFE, 0xFF, rest @ ..] => (TextEncoding::Utf16Be, rest),
        [a, 0, ..] if *a != 0 => (TextEncoding::Utf16Le, bytes),
        [0, b, ..] if *b != 0 => (TextEncoding::Utf16Be, bytes),
        _ => (TextEncoding::Utf8, bytes),
    };
    let text = match enc {
        TextEncoding::Utf8 => std::str::from_utf8(body)
            .map_err(|e| XmlError::Utf8(e.valid_up_to()))?
            .to_string(),
        TextEncoding::Utf16Le | TextEncoding::Utf16Be => {
            if body.len() % 2 != 0 {
                return Err(XmlError::OddLength(enc));
            }
            let units: Vec<u16> = body
                .chunks_exact(2)
                .map(|c| match enc {
                    TextEncoding::Utf16Le => u16::from_le_bytes([c[0], c[1]]),
                    _ => u16::from_be_bytes([c[0], c[1]]),
                })
                .collect();
            let mut s = String::from_utf16(&units).map_err(|_| XmlError::UnpairedSurrogate(enc))?;
            // Some writers end the file with a NUL.
            while s.ends_with('\0') {
                s.pop();
            }
            s
        }
    };
    Ok((text, enc))
}

/// An element with its attributes, child elements and text content (all text directly inside
/// it, concatenated, entities decoded).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// First child with this name (ASCII case-insensitive: hand-edited files vary).
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children
            .iter()
            .filter(move |c| c.name.eq_ignore_ascii_case(name))
    }

    /// Follows a path of child names.
    pub fn path(&self, names: &[&str]) -> Option<&Element> {
        let mut cur = self;
        for n in names {
            cur = cur.child(n)?;
        }
        Some(cur)
    }

    /// Trimmed text of the element at `names`, None when absent or empty.
    pub fn text_at(&self, names: &[&str]) -> Option<String> {
        self.path(names)
            .map(|e| e.text.trim().to_string())
            .filter(|t| !t.is_empty())
    }
}

/// Parses a document and returns its root element.
pub fn parse(text: &str) -> Result<Element> {
    let mut p = Parser { s: text, pos: 0 };
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        if p.eof() {
            break;
        }
        if p.starts_with("<!--") {
            p.skip_past("-->", "comment")?;
        } else if p.starts_with("<?") {
            p.skip_past("?>", "processing instruction")?;
        } else if p.starts_with("<![CDATA[") {
            let start = p.pos + 9;
            p.skip_past("]]>", "CDATA section")?;
            let data = &text[start..p.pos - 3];
            match stack.last_mut() {
                Some(e) => e.text.push_str(data),
                None => return Err(p.error("CDATA outside the root element")),
            }
        } else if p.starts_with("<!") {
            if !stack.is_empty() || root.is_some() {
                return Err(p.error("declaration inside the document"));
            }
            p.skip_past(">", "declaration")?;
        } else if p.starts_with("</") {
            p.pos += 2;
            let name = p.name()?;
            p.skip_ws();
            p.expect('>')?;
            let el = stack
                .pop()
                .ok_or_else(|| p.error(&format!("closing tag </{name}> without an opening tag")))?;
            if el.name != name {
                return Err(p.error(&format!("</{name}> closes <{}>", el.name)));
            }
            match stack.last_mut() {
                Some(parent) => parent.children.push(el),
                None => root = Some(el),
            }
        } else if p.starts_with("<") {
            if root.is_some() && stack.is_empty() {
                return Err(p.error("a second root element"));
            }
            p.pos += 1;
            let name = p.name()?;
            let mut el = Element {
                name,
                ..Element::default()
            };
            let self_closing = loop {
                p.skip_ws();
                if p.starts_with("/>") {
                    p.pos += 2;
                    break true;
                }
                if p.starts_with(">") {
                    p.pos += 1;
                    break false;
                }
                let key = p.name()?;
                p.skip_ws();
                p.expect('=')?;
                p.skip_ws();
                let value = p.quoted()?;
                el.attrs.push((key, value));
            };
            if self_closing {
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            } else {
                if stack.len() >= MAX_DEPTH {
                    return Err(p.error("elements nested too deeply"));
                }
                stack.push(el);
            }
        } else {
            let start = p.pos;
            let end = text[start..].find('<').map_or(text.len(), |i| start + i);
            p.pos = end;
            let raw = &text[start..end];
            match stack.last_mut() {
                Some(e) => e
                    .text
                    .push_str(&unescape(raw).map_err(|m| p.error_at(start, &m))?),
                None if raw.trim().is_empty() => {}
                None => return Err(p.error_at(start, "text outside the root element")),
            }
        }
    }
    if let Some(open) = stack.last() {
        return Err(XmlError::Unclosed(open.name.clone()));
    }
    root.ok_or(XmlError::NoRoot)
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn eof(&self) -> bool {
        self.pos >= self.s.len()
    }
    fn rest(&self) -> &str {
        &self.s[self.pos..]
    }
    fn starts_with(&self, p: &str) -> bool {
        self.rest().starts_with(p)
    }
    fn line_col(&self, at: usize) -> (usize, usize) {
        let before = &self.s[..at.min(self.s.len())];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rfind('\n')
            .map_or(before.len(), |i| before.len() - i - 1)
            + 1;
        (line, col)
    }
    fn error(&self, msg: &str) -> XmlError {
        self.error_at(self.pos, msg)
    }
    fn error_at(&self, at: usize, msg: &str) -> XmlError {
        let (line, column) = self.line_col(at);
        XmlError::Syntax {
            line,
            column,
            message: msg.to_string(),
        }
    }
    fn skip_past(&mut self, end: &str, what: &str) -> Result<()> {
        match self.rest().find(end) {
            Some(i) => {
                self.pos += i + end.len();
                Ok(())
            }
            None => Err(self.error(&format!("unterminated {what}"))),
        }
    }
    fn skip_ws(&mut self) {
        let n = self.rest().len() - self.rest().trim_start().len();
        self.pos += n;
    }
    fn expect(&mut self, c: char) -> Result<()> {
        if self.rest().starts_with(c) {
            self.pos += c.len_utf8();
            Ok(())
        } else {
            Err(self.error(&format!("expected {c:?}")))
        }
    }
    fn name(&mut self) -> Result<String> {
        let n = self
            .rest()
            .find(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
            .unwrap_or(self.rest().len());
        if n == 0 {
            return Err(self.error("expected a name"));
        }
        let name = self.rest()[..n].to_string();
        self.pos += n;
        Ok(name)
    }
    fn quoted(&mut self) -> Result<String> {
        let q = match self.rest().chars().next() {
            Some(c @ ('"' | '\'')) => c,
            _ => return Err(self.error("expected a quoted attribute value")),
        };
        let start = self.pos + 1;
        let len = self.s[start..]
            .find(q)
            .ok_or_else(|| self.error("unterminated attribute value"))?;
        self.pos = start + len + 1;
        unescape(&self.s[start..start + len]).map_err(|m| self.error_at(start, &m))
    }
}

/// Decodes `&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`, `&#N;` and `&#xH;`.
fn unescape(s: &str) -> std::result::Result<String, String> {
    if !s.contains('&') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let end = after
            .find(';')
            .filter(|&e| e <= 10)
            .ok_or_else(|| "unterminated entity reference".to_string())?;
        let ent = &after[..end];
        let c = match ent {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code =
                    if let Some(h) = ent.strip_prefix("#x").or_else(|| ent.strip_prefix("#X")) {
                        u32::from_str_radix(h, 16).ok()
                    } else if let Some(d) = ent.strip_prefix('#') {
                        d.parse::<u32>().ok()
                    } else {
                        None
                    };
                code.and_then(char::from_u32)
                    .ok_or_else(|| format!("unknown entity &{ent};"))?
            }
        };
        out.push(c);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16(s: &str, le: bool, bom: bool) -> Vec<u8> {
        let mut v = Vec::new();
        if bom {
            v.extend_from_slice(if le { &[0xFF, 0xFE] } else { &[0xFE, 0xFF] });
        }
        for u in s.encode_utf16() {
            v.extend_from_slice(&if le { u.to_le_bytes() } else { u.to_be_bytes() });
        }
        v
    }

    #[test]
    fn decodes_every_encoding() {
        let doc = "<?xml version=\"1.0\"?><a>é</a>";
        for (bytes, enc) in [
            (utf16(doc, true, true), TextEncoding::Utf16Le),
            (utf16(doc, false, true), TextEncoding::Utf16Be),
            (utf16(doc, true, false), TextEncoding::Utf16Le),
            (utf16(doc, false, false), TextEncoding::Utf16Be),
            (
                [&[0xEF, 0xBB, 0xBF][..], doc.as_bytes()].concat(),
                TextEncoding::Utf8,
            ),
            (doc.as_bytes().to_vec(), TextEncoding::Utf8),
        ] {
            let (text, e) = decode(&bytes).unwrap();
            assert_eq!(e, enc);
            assert_eq!(text, doc);
        }
        assert!(decode(&[0xFF, 0xFE, 0x3C]).is_err());
        assert!(decode(&[0xFF, 0xFE, 0x00, 0xD8, 0x41, 0x00]).is_err());
        assert!(decode(&[b'<', b'a', 0xFF, b'>']).is_err());
    }

    #[test]
    fn parses_elements_attributes_text_and_entities() {
        let doc = r#"<?xml version="1.0" encoding="UTF-16"?>
<!-- comment -->
<!DOCTYPE preferences>
<preferences>
  <x id="0" kind='a&amp;b'><name type="string">A &lt;B&gt; &#65;&#x42; &quot;q&quot;</name></x>
  <empty/>
  <c><![CDATA[<raw> & stuff]]></c>
</preferences>"#;
        let root = parse(doc).unwrap();
        assert_eq!(root.name, "preferences");
        let x = root.child("x").unwrap();
        assert_eq!(x.attr("id"), Some("0"));
        assert_eq!(x.attr("kind"), Some("a&b"));
        assert_eq!(root.text_at(&["x", "name"]).unwrap(), "A <B> AB \"q\"");
        assert!(root.child("EMPTY").is_some());
        assert_eq!(root.text_at(&["c"]).unwrap(), "<raw> & stuff");
        assert_eq!(root.text_at(&["empty"]), None);
    }

    #[test]
    fn rejects_malformed_documents_with_a_position() {
        for bad in [
            "<a><b></a>",
            "<a>",
            "</a>",
            "<a></a><b></b>",
            "<a x=1></a>",
            "<a>&bogus;</a>",
            "<a><!-- never closed</a>",
            "",
            "text",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(!e.is_empty(), "{bad}");
        }
        let e = parse("<a>\n  <b></c>\n</a>").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let doc = "<a>".repeat(100_000);
        assert!(parse(&doc).is_err());
    }
}
