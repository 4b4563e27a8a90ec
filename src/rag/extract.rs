//! The text of the documents users bring, by file type: plain text and Markdown as they are,
//! HTML and Word (`.docx`) converted to Markdown (headings kept, so the chunker keeps them with
//! their paragraphs), PDF's text layer page by page, and source code as it is.

use std::io::Read;
use std::path::Path;

use super::chunk::Kind;

/// A document's text and how it should be chunked.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    pub text: String,
    pub kind: Kind,
}

/// Why a file's text could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not UTF-8 text")]
    NotText,
    #[error("not a readable PDF: {0}")]
    Pdf(String),
    #[error("not a readable Word document: {0}")]
    Docx(String),
}

const PROSE: &[&str] = &["txt", "text", "rst", "org", "adoc", "tex"];
const MARKDOWN: &[&str] = &["md", "markdown", "mdx"];
const HTML: &[&str] = &["html", "htm", "xhtml"];
const CODE: &[&str] = &[
    "rs", "py", "js", "mjs", "cjs", "ts", "tsx", "jsx", "go", "java", "kt", "kts", "scala", "c", "h", "cc", "cpp", "cxx", "hpp", "hh", "cs", "rb",
    "php", "swift", "m", "mm", "lua", "r", "jl", "hs", "ex", "exs", "erl", "clj", "dart", "zig", "nim", "sh", "bash", "zsh", "fish", "ps1", "sql",
    "toml", "yaml", "yml", "json", "jsonl", "xml", "css", "scss", "less", "vue", "svelte", "proto", "graphql", "tf", "cmake", "mk", "gradle", "ini",
    "cfg", "conf",
];
const CODE_NAMES: &[&str] = &["Makefile", "Dockerfile", "Justfile", "Rakefile", "Gemfile", "CMakeLists.txt"];

/// How a file of this name is read, if it is.
pub fn kind_of(path: &Path) -> Option<Kind> {
    let name = path.file_name()?.to_string_lossy();
    if CODE_NAMES.contains(&name.as_ref()) {
        return Some(Kind::Code);
    }
    let extension = path.extension()?.to_string_lossy().to_ascii_lowercase();
    let extension = extension.as_str();
    if PROSE.contains(&extension) || extension == "pdf" {
        Some(Kind::Prose)
    } else if MARKDOWN.contains(&extension) || HTML.contains(&extension) || extension == "docx" {
        Some(Kind::Markdown)
    } else if CODE.contains(&extension) {
        Some(Kind::Code)
    } else {
        None
    }
}

/// A document's text; `Ok(None)` for file types that are not read.
pub fn read(path: &Path) -> Result<Option<Extracted>, ExtractError> {
    let Some(kind) = kind_of(path) else { return Ok(None) };
    let extension = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let bytes = std::fs::read(path)?;
    let text = match extension.as_str() {
        "pdf" => pdf_text(&bytes)?,
        "docx" => docx_text(&bytes)?,
        _ => {
            let text = String::from_utf8(bytes).map_err(|_| ExtractError::NotText)?;
            if HTML.contains(&extension.as_str()) {
                html_to_markdown(&text)
            } else {
                text
            }
        }
    };
    Ok(Some(Extracted { text, kind }))
}

/// The text layer of a PDF, pages separated by blank lines. A scanned PDF (images only) has
/// none and reads as empty.
pub fn pdf_text(bytes: &[u8]) -> Result<String, ExtractError> {
    let document = lopdf::Document::load_mem(bytes).map_err(|e| ExtractError::Pdf(e.to_string()))?;
    if document.is_encrypted() {
        return Err(ExtractError::Pdf("the file is encrypted".into()));
    }
    let mut pages = Vec::new();
    for number in document.get_pages().keys() {
        let text = document.extract_text(&[*number]).map_err(|e| ExtractError::Pdf(format!("page {number}: {e}")))?;
        // lopdf ends every text run with a newline; lines of one paragraph read better joined.
        let text = text.lines().map(str::trim).collect::<Vec<_>>().join("\n");
        let text = text.trim();
        if !text.is_empty() {
            pages.push(text.to_string());
        }
    }
    Ok(pages.join("\n\n"))
}

/// Word's body text as Markdown: one paragraph per `<w:p>`, headings (`Heading1`..`Heading6`
/// and `Title` styles) as `#` lines, list paragraphs as `- ` items, tables row by row.
pub fn docx_text(bytes: &[u8]) -> Result<String, ExtractError> {
    use quick_xml::events::Event;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| ExtractError::Docx(e.to_string()))?;
    let mut xml = String::new();
    archive
        .by_name("word/document.xml")
        .map_err(|e| ExtractError::Docx(format!("word/document.xml: {e}")))?
        // A zip bomb stops at 64 MiB of XML.
        .take(64 << 20)
        .read_to_string(&mut xml)
        .map_err(|e| ExtractError::Docx(e.to_string()))?;
    let mut reader = quick_xml::Reader::from_str(&xml);
    let mut paragraphs: Vec<String> = Vec::new();
    let mut paragraph = String::new();
    let mut prefix = String::new();
    let mut in_text = false;
    let mut cells: Vec<String> = Vec::new();
    let mut table_depth = 0usize;
    loop {
        match reader.read_event().map_err(|e| ExtractError::Docx(e.to_string()))? {
            Event::Start(element) | Event::Empty(element) => {
                match element.name().0 {
                    "w:p" => {
                        paragraph.clear();
                        prefix.clear();
                    }
                    "w:t" => in_text = true,
                    "w:tab" => paragraph.push('\t'),
                    "w:br" => paragraph.push('\n'),
                    "w:pStyle" => {
                        let style = element
                            .attributes()
                            .flatten()
                            .find(|a| a.key.0 == "w:val")
                            .map(|a| a.value.to_string())
                            .unwrap_or_default();
                        let lower = style.to_ascii_lowercase();
                        if lower == "title" {
                            prefix = "# ".into();
                        } else if let Some(level) = lower.strip_prefix("heading").and_then(|l| l.parse::<usize>().ok()) {
                            prefix = format!("{} ", "#".repeat(level.clamp(1, 6)));
                        } else if lower.contains("list") {
                            prefix = "- ".into();
                        }
                    }
                    "w:numPr" if prefix.is_empty() => prefix = "- ".into(),
                    "w:tbl" => table_depth += 1,
                    "w:tr" => cells.clear(),
                    _ => {}
                }
            }
            Event::Text(text) if in_text => {
                // Entity references come as their own events, so text is already plain.
                paragraph.push_str(&text.into_inner());
            }
            Event::GeneralRef(reference) if in_text => {
                let entity = format!("&{};", reference.into_inner());
                paragraph.push_str(&quick_xml::escape::unescape(&entity).map_err(|e| ExtractError::Docx(e.to_string()))?);
            }
            Event::End(element) => match element.name().0 {
                "w:t" => in_text = false,
                "w:p" => {
                    let text = paragraph.trim();
                    if !text.is_empty() {
                        let line = format!("{prefix}{text}");
                        // A table's paragraphs are its cells, written out row by row.
                        if table_depth > 0 {
                            cells.push(line);
                        } else {
                            paragraphs.push(line);
                        }
                    }
                    paragraph.clear();
                }
                "w:tbl" => table_depth = table_depth.saturating_sub(1),
                "w:tr" => {
                    if !cells.is_empty() {
                        paragraphs.push(format!("| {} |", cells.join(" | ")));
                    }
                    cells.clear();
                }
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(paragraphs.join("\n\n"))
}

/// The visible text of an HTML page as Markdown: headings as `#` lines, paragraphs and list
/// items on their own lines; scripts, styles and tags removed, entities decoded.
pub fn html_to_markdown(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let lower = html.to_ascii_lowercase();
    let mut index = 0;
    while index < html.len() {
        if html[index..].starts_with('<') {
            let mut skipped = false;
            for hidden in ["<script", "<style", "<!--"] {
                if lower[index..].starts_with(hidden) {
                    let close = if hidden == "<!--" { "-->".to_string() } else { format!("</{}", &hidden[1..]) };
                    index = lower[index..].find(&close).map(|end| index + end + close.len()).unwrap_or(html.len());
                    if hidden != "<!--" {
                        index = html[index..].find('>').map(|end| index + end + 1).unwrap_or(html.len());
                    }
                    skipped = true;
                }
            }
            if skipped {
                continue;
            }
            let tag_end = html[index..].find('>').map(|end| index + end + 1).unwrap_or(html.len());
            let tag = &lower[index..tag_end];
            let heading = (1..=6).find(|level| tag.starts_with(&format!("<h{level}")) && !tag[3..].starts_with(|c: char| c.is_ascii_alphanumeric()));
            if let Some(level) = heading {
                text.push_str("\n\n");
                text.push_str(&"#".repeat(level));
                text.push(' ');
            } else if tag.starts_with("<li") {
                text.push_str("\n\n- ");
            } else if ["<p", "<br", "<div", "<tr", "<table", "<section", "<article", "<blockquote", "<pre", "</p", "</div", "</h", "</li", "</tr", "</ul", "</ol"]
                .iter()
                .any(|t| tag.starts_with(t))
            {
                text.push_str("\n\n");
            } else if tag.starts_with("<td") || tag.starts_with("<th") {
                text.push_str(" | ");
            }
            index = tag_end;
        } else {
            let next = html[index..].find('<').map(|n| index + n).unwrap_or(html.len());
            text.push_str(&html[index..next]);
            index = next;
        }
    }
    let text = decode_entities(&text);
    let mut collapsed = String::new();
    for paragraph in text.split("\n\n") {
        let line = paragraph.split_whitespace().collect::<Vec<_>>().join(" ");
        let line = line.trim_start_matches("| ").trim();
        if !line.is_empty() && line != "-" && !line.chars().all(|c| c == '#') {
            collapsed.push_str(line);
            collapsed.push_str("\n\n");
        }
    }
    collapsed.trim_end().to_string()
}

fn decode_entities(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('&') {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let Some(end) = rest[..rest.len().min(12)].find(';') else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..end];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some(' '),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_becomes_markdown() {
        let html = "<html><head><style>p{}</style><script>var x=1;</script></head><body><!-- note --><h1>Title</h1><p>Hello &amp; welcome &#x263A;</p><h2 class=x>Part</h2><ul><li>one</li><li>two</li></ul><header>x</header></body></html>";
        assert_eq!(html_to_markdown(html), "# Title\n\nHello & welcome \u{263A}\n\n## Part\n\n- one\n\n- two\n\nx");
    }

    #[test]
    fn kinds_by_name() {
        assert_eq!(kind_of(Path::new("a/notes.MD")), Some(Kind::Markdown));
        assert_eq!(kind_of(Path::new("main.rs")), Some(Kind::Code));
        assert_eq!(kind_of(Path::new("Makefile")), Some(Kind::Code));
        assert_eq!(kind_of(Path::new("paper.pdf")), Some(Kind::Prose));
        assert_eq!(kind_of(Path::new("photo.jpg")), None);
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/docs").join(name)
    }

    /// Fixtures written by scripts/reference/make_doc_fixtures.py (Python's standard library).
    #[test]
    fn pdf_text_layer_page_by_page() {
        let extracted = read(&fixture("comet.pdf")).unwrap().unwrap();
        assert_eq!(extracted.kind, Kind::Prose);
        let pages: Vec<&str> = extracted.text.split("\n\n").collect();
        assert_eq!(pages.len(), 2, "{}", extracted.text);
        assert!(pages[0].starts_with("Observatory notes, volume two."), "{}", pages[0]);
        assert!(pages[1].contains("The comet Vashti returns every 83 years.") && pages[1].contains("glows teal"), "{}", pages[1]);
    }

    #[test]
    fn word_documents_become_markdown() {
        let extracted = read(&fixture("garden.docx")).unwrap().unwrap();
        assert_eq!(extracted.kind, Kind::Markdown);
        assert_eq!(
            extracted.text,
            "# Kestrel Hotel\n\n# Garden\n\nThe rooftop garden of the Kestrel Hotel grows blue tomatoes & silver basil.\n\n- Watering happens at dawn.\n\n| Season | Harvest |\n\n| Autumn | Blue tomatoes |"
        );
    }

    #[test]
    fn broken_files_are_errors_not_panics() {
        assert!(pdf_text(b"%PDF-1.4 garbage").is_err());
        assert!(docx_text(b"PK\x03\x04 not a zip").is_err());
        assert!(pdf_text(&[]).is_err());
    }
}
