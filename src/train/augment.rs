//! Chat-spelling augmentation: teaches the model that "vc não recebeu" and
//! "Você não recebeu?" are the same message.
//!
//! Each training example is rewritten, with probability `p` per epoch, by a
//! random subset of: accents dropped, lower case, common abbreviations, typos.
//! The generator is the trainer's seeded one, so runs are reproducible.

use rand::{rngs::StdRng, Rng};

/// Whole-word rewrites customers use in chat (lower-case keys, matched case-insensitively).
const ABBREVIATIONS: &[(&str, &str)] = &[
    ("você", "vc"),
    ("voce", "vc"),
    ("vocês", "vcs"),
    ("voces", "vcs"),
    ("que", "q"),
    ("porque", "pq"),
    ("também", "tb"),
    ("tambem", "tb"),
    ("obrigado", "obg"),
    ("obrigada", "obg"),
    ("beleza", "blz"),
    ("tudo", "td"),
    ("mesmo", "msm"),
    ("quando", "qnd"),
    ("hoje", "hj"),
    ("para", "pra"),
    ("está", "tá"),
    ("estou", "tô"),
    ("não", "n"),
    ("muito", "mt"),
    ("quanto", "qto"),
    ("quantos", "qtos"),
    ("gostaria", "queria"),
    ("mensagem", "msg"),
    ("favor", "fv"),
    ("aqui", "aki"),
];

/// Rewrites `text` in chat spelling, or returns it unchanged (probability `1 - p`).
pub fn augment(text: &str, p: f64, rng: &mut StdRng) -> String {
    if p <= 0.0 || rng.random::<f64>() >= p {
        return text.to_string();
    }
    let mut out = text.to_string();
    if rng.random_bool(0.5) {
        out = out.to_lowercase();
    }
    if rng.random_bool(0.5) {
        out = strip_accents(&out);
    }
    if rng.random_bool(0.5) {
        out = abbreviate(&out, rng);
    }
    if rng.random_bool(0.4) {
        out = typos(&out, rng);
    }
    out
}

/// Drops Portuguese diacritics: "não é possível" → "nao e possivel".
pub fn strip_accents(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            'á' | 'à' | 'â' | 'ã' | 'ä' => 'a',
            'Á' | 'À' | 'Â' | 'Ã' | 'Ä' => 'A',
            'é' | 'è' | 'ê' | 'ë' => 'e',
            'É' | 'È' | 'Ê' | 'Ë' => 'E',
            'í' | 'ì' | 'î' | 'ï' => 'i',
            'Í' | 'Ì' | 'Î' | 'Ï' => 'I',
            'ó' | 'ò' | 'ô' | 'õ' | 'ö' => 'o',
            'Ó' | 'Ò' | 'Ô' | 'Õ' | 'Ö' => 'O',
            'ú' | 'ù' | 'û' | 'ü' => 'u',
            'Ú' | 'Ù' | 'Û' | 'Ü' => 'U',
            'ç' => 'c',
            'Ç' => 'C',
            other => other,
        })
        .collect()
}

/// Replaces about half of the words that have a chat abbreviation.
fn abbreviate(text: &str, rng: &mut StdRng) -> String {
    map_words(text, |word| {
        let lower = word.to_lowercase();
        ABBREVIATIONS
            .iter()
            .find(|(long, _)| *long == lower)
            .filter(|_| rng.random_bool(0.6))
            .map(|(_, short)| short.to_string())
    })
}

/// One typo (swap, drop or double a letter) in about one word of eight longer than three letters.
fn typos(text: &str, rng: &mut StdRng) -> String {
    map_words(text, |word| {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() <= 3 || !chars.iter().all(|c| c.is_alphabetic()) || !rng.random_bool(0.125) {
            return None;
        }
        let mut chars = chars;
        let i = rng.random_range(1..chars.len() - 1);
        match rng.random_range(0..3) {
            0 => chars.swap(i, i + 1),
            1 => {
                chars.remove(i);
            }
            _ => chars.insert(i, chars[i]),
        }
        Some(chars.into_iter().collect())
    })
}

/// Applies `f` to each maximal run of letters, keeping everything else as it is.
fn map_words(text: &str, mut f: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let mut flush = |word: &mut String, out: &mut String| {
        if !word.is_empty() {
            out.push_str(&f(word).unwrap_or_else(|| word.clone()));
            word.clear();
        }
    };
    for c in text.chars() {
        if c.is_alphabetic() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn strips_accents() {
        assert_eq!(strip_accents("Não recebi o fogão, já está atrasado"), "Nao recebi o fogao, ja esta atrasado");
    }

    #[test]
    fn abbreviates_whole_words_only() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut seen_short = false;
        for _ in 0..20 {
            let out = abbreviate("Você sabe porque o queijo", &mut rng);
            assert!(out.ends_with("o queijo"), "{out}");
            seen_short |= out.starts_with("vc ");
        }
        assert!(seen_short);
    }

    #[test]
    fn same_seed_same_rewrites() {
        let text = "Olá, você poderia me dizer quando chega o pedido #4821? Obrigado!";
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..50).map(|_| augment(text, 0.8, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert!(run(7).iter().any(|t| t != text));
        assert!(run(7).iter().all(|t| t.contains("4821")), "digits are never touched");
    }
}
