//! Splitting documents into token-sized chunks, by the document's kind:
//! - prose along paragraph and sentence boundaries (Japanese 。！？ included), with an overlap
//!   of whole sentences between neighbours;
//! - Markdown (and what is converted to it: HTML, Word) by sections: a heading stays with its
//!   paragraphs, a section that fits is never split, and the chunks of a longer one each
//!   start with its heading;
//! - source code by blocks between blank lines (a function, a class), then by lines.

/// Splits text into sentences, keeping their end punctuation and the spacing after it.
/// Paragraph breaks (blank lines) always end a sentence.
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for paragraph in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        let mut current = String::new();
        let mut chars = paragraph.chars().peekable();
        while let Some(c) = chars.next() {
            current.push(c);
            let ends = match c {
                '。' | '！' | '？' | '!' | '?' => true,
                '.' => chars.peek().is_none_or(|next| next.is_whitespace()),
                '\n' => true,
                _ => false,
            };
            if ends {
                // Closing quotes and brackets stay with their sentence.
                while let Some(&next) = chars.peek() {
                    if matches!(next, '」' | '』' | '）' | ')' | '"' | '\'' | '”') {
                        current.push(next);
                        chars.next();
                    } else {
                        break;
                    }
                }
                while chars.peek().is_some_and(|n| *n == ' ' || *n == '\t') {
                    chars.next();
                }
                let sentence = current.trim().to_string();
                if !sentence.is_empty() {
                    out.push(sentence);
                }
                current.clear();
            }
        }
        let rest = current.trim();
        if !rest.is_empty() {
            out.push(rest.to_string());
        }
        // Mark the paragraph end so chunks can prefer it.
        if let Some(last) = out.last_mut() {
            last.push('\n');
        }
    }
    out
}

/// Joins sentences back into text: a space between Latin sentences, nothing between CJK
/// ones, a blank line after a paragraph end.
fn join(sentences: &[&str]) -> String {
    let mut text = String::new();
    for sentence in sentences {
        if !text.is_empty() {
            if text.ends_with('\n') {
                text.push('\n');
            } else if !text.ends_with(|c: char| is_cjk(c)) {
                text.push(' ');
            }
        }
        text.push_str(sentence);
    }
    text.trim().to_string()
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x3000..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xFF00..=0xFFEF)
}

/// Packs sentences into chunks of at most `size` tokens (as `count` measures them), each
/// starting with up to `overlap` tokens of the previous chunk's last sentences. A sentence
/// longer than `size` is cut by `split_long`.
pub fn chunk(text: &str, size: usize, overlap: usize, count: &dyn Fn(&str) -> usize, split_long: &dyn Fn(&str, usize) -> Vec<String>) -> Vec<String> {
    let size = size.max(8);
    let overlap = overlap.min(size / 2);
    let mut pieces: Vec<(String, usize)> = Vec::new();
    for sentence in sentences(text) {
        let tokens = count(&sentence);
        if tokens > size {
            for part in split_long(&sentence, size) {
                let tokens = count(&part);
                pieces.push((part, tokens));
            }
        } else {
            pieces.push((sentence, tokens));
        }
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < pieces.len() {
        let mut end = start;
        let mut total = 0;
        while end < pieces.len() && (end == start || total + pieces[end].1 <= size) {
            total += pieces[end].1;
            end += 1;
        }
        let parts: Vec<&str> = pieces[start..end].iter().map(|(s, _)| s.as_str()).collect();
        chunks.push(join(&parts));
        if end >= pieces.len() {
            break;
        }
        // Step back over whole sentences for the overlap, but always move forward.
        let mut next = end;
        let mut carried = 0;
        while next > start + 1 && carried + pieces[next - 1].1 <= overlap {
            carried += pieces[next - 1].1;
            next -= 1;
        }
        start = next;
    }
    chunks
}

/// What a document's text is, which decides how it is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Prose,
    Markdown,
    Code,
}

/// Chunks `text` as its kind needs (see the module's description).
pub fn chunk_kind(kind: Kind, text: &str, size: usize, overlap: usize, count: &dyn Fn(&str) -> usize, split_long: &dyn Fn(&str, usize) -> Vec<String>) -> Vec<String> {
    match kind {
        Kind::Prose => chunk(text, size, overlap, count, split_long),
        Kind::Markdown => chunk_markdown(text, size, overlap, count, split_long),
        Kind::Code => chunk_code(text, size, count, split_long),
    }
}

/// A Markdown heading line (`# ...` to `###### ...`).
fn is_heading(line: &str) -> bool {
    let hashes = line.chars().take_while(|c| *c == '#').count();
    (1..=6).contains(&hashes) && line[hashes..].starts_with(' ')
}

/// Markdown sections: (heading line or "", body). Headings inside ``` fences do not count.
fn sections(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![(String::new(), String::new())];
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && is_heading(line) {
            out.push((line.trim().to_string(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out.retain(|(heading, body)| !heading.is_empty() || !body.trim().is_empty());
    out
}

fn section_text(heading: &str, body: &str) -> String {
    match (heading.is_empty(), body.trim().is_empty()) {
        (true, _) => body.trim().to_string(),
        (false, true) => heading.to_string(),
        (false, false) => format!("{heading}\n\n{}", body.trim()),
    }
}

fn chunk_markdown(text: &str, size: usize, overlap: usize, count: &dyn Fn(&str) -> usize, split_long: &dyn Fn(&str, usize) -> Vec<String>) -> Vec<String> {
    let size = size.max(8);
    let mut chunks = Vec::new();
    let mut current = String::new();
    let mut current_tokens = 0;
    for (heading, body) in sections(text) {
        let whole = section_text(&heading, &body);
        let tokens = count(&whole);
        if tokens <= size {
            // Whole sections are packed together while they fit.
            if !current.is_empty() && current_tokens + tokens > size {
                chunks.push(std::mem::take(&mut current));
                current_tokens = 0;
            }
            if !current.is_empty() {
                current.push_str("\n\n");
            }
            current.push_str(&whole);
            current_tokens += tokens;
            continue;
        }
        if !current.is_empty() {
            chunks.push(std::mem::take(&mut current));
            current_tokens = 0;
        }
        // A long section: its body in prose chunks, each under the section's heading.
        let heading_tokens = if heading.is_empty() { 0 } else { count(&heading) + 1 };
        let room = size.saturating_sub(heading_tokens).max(size / 2);
        for piece in chunk(&body, room, overlap, count, split_long) {
            chunks.push(if heading.is_empty() { piece } else { format!("{heading}\n\n{piece}") });
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

fn chunk_code(text: &str, size: usize, count: &dyn Fn(&str) -> usize, split_long: &dyn Fn(&str, usize) -> Vec<String>) -> Vec<String> {
    let size = size.max(8);
    // Blocks between blank lines; a block too long for one chunk becomes its lines. Each
    // piece keeps the separator that came before it, so chunks read as the source did.
    let mut pieces: Vec<(&str, String, usize)> = Vec::new();
    for block in text.split("\n\n").map(|b| b.trim_matches('\n')).filter(|b| !b.trim().is_empty()) {
        let tokens = count(block);
        if tokens <= size {
            pieces.push(("\n\n", block.to_string(), tokens));
            continue;
        }
        for (index, line) in block.lines().enumerate() {
            let separator = if index == 0 { "\n\n" } else { "\n" };
            let tokens = count(line);
            if tokens <= size {
                pieces.push((separator, line.to_string(), tokens));
            } else {
                pieces.extend(split_long(line, size).into_iter().map(|part| {
                    let tokens = count(&part);
                    (separator, part, tokens)
                }));
            }
        }
    }
    let mut chunks = Vec::new();
    let mut current = String::new();
    let mut current_tokens = 0;
    for (separator, piece, tokens) in pieces {
        if !current.is_empty() && current_tokens + tokens > size {
            chunks.push(std::mem::take(&mut current));
            current_tokens = 0;
        }
        if !current.is_empty() {
            current.push_str(separator);
        }
        current.push_str(&piece);
        current_tokens += tokens;
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> usize {
        text.split_whitespace().count().max(text.chars().filter(|c| is_cjk(*c)).count() / 2)
    }

    fn split_words(text: &str, size: usize) -> Vec<String> {
        text.split_whitespace().collect::<Vec<_>>().chunks(size).map(|c| c.join(" ")).collect()
    }

    #[test]
    fn sentences_in_english_and_japanese() {
        assert_eq!(sentences("One. Two? Three!"), vec!["One.", "Two?", "Three!\n"]);
        assert_eq!(sentences("東京は首都です。大阪は大きい。「本当？」"), vec!["東京は首都です。", "大阪は大きい。", "「本当？」\n"]);
        assert_eq!(sentences("Version 1.5 is out. Yes"), vec!["Version 1.5 is out.", "Yes\n"]);
        assert_eq!(sentences("A.\n\nB."), vec!["A.\n", "B.\n"]);
    }

    #[test]
    fn chunks_respect_size_and_overlap() {
        let text = (0..40).map(|i| format!("Sentence number {i} has six words.")).collect::<Vec<_>>().join(" ");
        let chunks = chunk(&text, 30, 6, &words, &split_words);
        assert!(chunks.len() > 5);
        for chunk in &chunks {
            assert!(words(chunk) <= 30, "{chunk}");
        }
        // Neighbours share the overlapping sentence.
        let last_of_first = chunks[0].rsplit_once("Sentence").unwrap().1;
        assert!(chunks[1].contains(last_of_first.trim()), "{:?}", &chunks[..2]);
        // Every sentence is somewhere.
        for i in 0..40 {
            assert!(chunks.iter().any(|c| c.contains(&format!("number {i} "))), "{i}");
        }
    }

    #[test]
    fn long_sentences_are_cut() {
        let text = "word ".repeat(100);
        let chunks = chunk(&text, 20, 0, &words, &split_words);
        assert_eq!(chunks.len(), 5);
    }

    #[test]
    fn markdown_headings_stay_with_their_paragraphs() {
        let text = "# Title\n\nIntro words here.\n\n## Install\n\nRun the installer now.\n\n```sh\n# not a heading\n```\n\n## Usage\n\n".to_string()
            + &(0..20).map(|i| format!("Usage sentence {i} is here.")).collect::<Vec<_>>().join(" ");
        let chunks = chunk_kind(Kind::Markdown, &text, 30, 0, &words, &split_words);
        // The two short sections share a chunk; no chunk ends with a bare heading.
        assert!(chunks[0].starts_with("# Title") && chunks[0].contains("## Install\n\nRun the installer"), "{chunks:?}");
        for chunk in &chunks {
            assert!(words(chunk) <= 30, "{chunk}");
            assert!(!chunk.trim_end().lines().last().is_some_and(is_heading), "{chunk}");
        }
        // Every piece of the long section carries its heading.
        let usage: Vec<&String> = chunks.iter().filter(|c| c.contains("Usage sentence")).collect();
        assert!(usage.len() > 1);
        assert!(usage.iter().all(|c| c.starts_with("## Usage")), "{usage:?}");
        // The fence stays whole, with its comment line, inside the Install section's chunk.
        assert!(chunks[0].contains("```sh\n# not a heading\n```"), "{chunks:?}");
    }

    #[test]
    fn code_is_cut_between_blocks() {
        let function = |name: &str| format!("fn {name}() {{\n    let x = 1;\n    x + 1\n}}");
        let text = [function("a"), function("b"), function("c"), function("d")].join("\n\n");
        let chunks = chunk_kind(Kind::Code, &text, 24, 0, &words, &split_words);
        assert!(chunks.len() >= 2, "{chunks:?}");
        for chunk in &chunks {
            // Whole functions only: every chunk that opens one closes it.
            assert_eq!(chunk.matches('{').count(), chunk.matches('}').count(), "{chunk}");
            assert!(words(chunk) <= 24);
        }
        assert_eq!(chunks.join("\n\n"), text);
    }
}
