//! Splitting documents into token-sized chunks along paragraph and sentence boundaries
//! (Japanese 。！？ included), with an overlap of whole sentences between neighbours.

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
}
