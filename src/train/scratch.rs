//! `--base none`: a WordPiece tokenizer trained on the training texts and a
//! small BERT configuration, for training without any pretrained checkpoint.
//!
//! The vocabulary is chosen here by byte-pair merges over the word counts,
//! ties broken by the merged text. The `tokenizers` crate's own WordPiece
//! trainer breaks ties by ids assigned in hash-map order (ahash, seeded at
//! random per process), so two runs on the same data give different
//! vocabularies, and `triagem train` promises the same model for the same
//! seed. Normalisation, pre-tokenisation, the WordPiece model and the
//! `[CLS] … [SEP]` framing are the `tokenizers` crate's, so the result is an
//! ordinary `tokenizer.json` that `transformers` loads.

use std::collections::{BTreeMap, HashMap};

use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    SplitDelimiterBehavior, Tokenizer,
};

/// Special tokens, in id order: `[PAD]` is 0, as `pad_token_id` says.
const SPECIAL: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
/// Prefix of a piece that continues a word.
pub(crate) const CONTINUE: &str = "##";
/// A merge must be seen at least this often.
const MIN_FREQUENCY: u64 = 2;

/// Trains an uncased, accent-stripping WordPiece tokenizer of at most `vocab_size` entries.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<Tokenizer, String> {
    train_tokenizer_on(texts, vocab_size, 1, false)
}

/// [`train_tokenizer`] learning its merges from the words seen at least
/// `min_count` times only (every character still gets a piece): on a large
/// corpus the rare words, most of them, only slow the merges down.
///
/// With `morphology`, the pre-tokenizer also cuts a word before one of
/// Brazilian Portuguese's inflectional endings ([`SUFFIXES`]: verb endings,
/// plurals of participles, diminutives, `-mente`, `-ção`) when at least three
/// letters come before it: `comprei` → `compr` `ei`, `comprar` → `compr` `ar`,
/// `compraram` → `compr` `aram`. The cut is a `Split` pre-tokenizer (a
/// regular expression) in `tokenizer.json`, so it happens when a text is
/// encoded, in triagem and in `transformers` alike, not only when the
/// vocabulary is learnt; the ending is a piece of its own (shared with a word
/// spelt the same, such as `ou`, "or").
pub fn train_tokenizer_on(
    texts: &[String],
    vocab_size: usize,
    min_count: u64,
    morphology: bool,
) -> Result<Tokenizer, String> {
    let normalizer = BertNormalizer::new(true, true, Some(true), true);
    let pre_tokenizer = pre_tokenizer(morphology)?;
    let all = count_words(texts, &normalizer, &pre_tokenizer)?;
    let frequent: BTreeMap<String, u64> =
        all.iter().filter(|(_, &n)| n >= min_count).map(|(w, &n)| (w.clone(), n)).collect();
    let vocab = build_vocab(&frequent, &alphabet(&all), vocab_size);
    let cls = vocab["[CLS]"];
    let sep = vocab["[SEP]"];
    let model = WordPiece::builder()
        .vocab(vocab.into_iter().collect::<ahash::AHashMap<String, u32>>())
        .unk_token("[UNK]".into())
        .continuing_subword_prefix(CONTINUE.into())
        .build()
        .map_err(|e| e.to_string())?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| e.to_string())?
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))))
        .with_decoder(Some(WordPieceDecoder::default()));
    Ok(tokenizer)
}

/// Words as the tokenizer will see them (normalised, split), with their counts.
fn count_words(
    texts: &[String],
    normalizer: &BertNormalizer,
    pre_tokenizer: &PreTokenizerWrapper,
) -> Result<BTreeMap<String, u64>, String> {
    let mut counts = BTreeMap::new();
    for text in texts {
        let mut normalized = NormalizedString::from(text.as_str());
        normalizer.normalize(&mut normalized).map_err(|e| e.to_string())?;
        let mut pre = PreTokenizedString::from(normalized);
        pre_tokenizer.pre_tokenize(&mut pre).map_err(|e| e.to_string())?;
        for (word, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            *counts.entry(word.to_string()).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// Inflectional endings of Brazilian Portuguese as the normaliser leaves them
/// (lower case, accents stripped). Order does not matter: the cut is the
/// leftmost match that runs to the word's end, which is the longest ending.
pub const SUFFIXES: [&str; 52] = [
    "ariamos", "eriamos", "iriamos", "assemos", "essemos", "issemos", "aremos", "eremos", "iremos", "avamos", "zinhos",
    "zinhas", "ariam", "eriam", "iriam", "assem", "essem", "issem", "mente", "zinho", "zinha", "inhos", "inhas",
    "aram", "eram", "iram", "avam", "ando", "endo", "indo", "ados", "adas", "idos", "idas", "amos", "emos", "imos",
    "aria", "eria", "iria", "inho", "inha", "coes", "cao", "ava", "ado", "ada", "ido", "ida", "ar", "ei", "ou",
];
/// BERT's pre-tokenizer (whitespace and punctuation), then with `morphology`
/// each word's ending of [`SUFFIXES`] cut off when three letters precede it.
fn pre_tokenizer(morphology: bool) -> Result<PreTokenizerWrapper, String> {
    if !morphology {
        return Ok(BertPreTokenizer.into());
    }
    // Split runs on each word alone: `\z` is the word's end; the leftmost match is the longest ending.
    let pattern = format!("(?<=[a-z]{{3}})(?:{})\\z", SUFFIXES.join("|"));
    let split =
        Split::new(SplitPattern::Regex(pattern), SplitDelimiterBehavior::Isolated, false).map_err(|e| e.to_string())?;
    Ok(Sequence::new(vec![BertPreTokenizer.into(), split.into()]).into())
}

/// Every character of `words`, word-initial and `##`-continuing, sorted.
fn alphabet(words: &BTreeMap<String, u64>) -> Vec<String> {
    let mut alphabet: Vec<String> = words
        .keys()
        .flat_map(|w| w.chars().enumerate().map(|(i, c)| if i == 0 { c.to_string() } else { format!("{CONTINUE}{c}") }))
        .collect();
    alphabet.sort();
    alphabet.dedup();
    alphabet
}

/// Special tokens, the `alphabet`, then pieces merged over `words` in merge
/// order until `vocab_size`: token → id.
fn build_vocab(words: &BTreeMap<String, u64>, alphabet: &[String], vocab_size: usize) -> BTreeMap<String, u32> {
    let mut pieces: Vec<(Vec<String>, u64)> = words
        .iter()
        .map(|(w, &n)| {
            let symbols = w
                .chars()
                .enumerate()
                .map(|(i, c)| if i == 0 { c.to_string() } else { format!("{CONTINUE}{c}") })
                .collect();
            (symbols, n)
        })
        .collect();
    let mut ordered: Vec<String> = SPECIAL.iter().map(|s| s.to_string()).collect();
    ordered.extend(alphabet.iter().cloned());
    while ordered.len() < vocab_size {
        let mut pairs: HashMap<(&str, &str), u64> = HashMap::new();
        for (symbols, n) in &pieces {
            for w in symbols.windows(2) {
                *pairs.entry((w[0].as_str(), w[1].as_str())).or_insert(0) += n;
            }
        }
        // Most frequent pair; ties go to the alphabetically first merged text.
        let Some(((a, b), count)) = pairs
            .into_iter()
            .map(|((a, b), n)| ((a.to_string(), b.to_string()), n))
            .min_by(|(p, n), (q, m)| m.cmp(n).then_with(|| merged(&p.0, &p.1).cmp(&merged(&q.0, &q.1))))
        else {
            break;
        };
        if count < MIN_FREQUENCY {
            break;
        }
        let joined = merged(&a, &b);
        for (symbols, _) in &mut pieces {
            let mut i = 0;
            while i + 1 < symbols.len() {
                if symbols[i] == a && symbols[i + 1] == b {
                    symbols[i] = joined.clone();
                    symbols.remove(i + 1);
                }
                i += 1;
            }
        }
        ordered.push(joined);
    }
    let mut vocab = BTreeMap::new();
    for token in ordered {
        let id = vocab.len() as u32;
        vocab.entry(token).or_insert(id);
    }
    vocab
}

/// The piece made by joining `a` and a following `b`.
fn merged(a: &str, b: &str) -> String {
    format!("{a}{}", b.strip_prefix(CONTINUE).unwrap_or(b))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    #[test]
    fn trained_tokenizer_frames_with_cls_sep_and_pads_with_zero() {
        let texts: Vec<String> = ["quero comprar uma geladeira", "minha geladeira quebrou", "Não recebi o pedido"]
            .iter()
            .cycle()
            .take(30)
            .map(|s| s.to_string())
            .collect();
        let tok = train_tokenizer(&texts, 200).unwrap();
        assert_eq!(tok.token_to_id("[PAD]"), Some(0));
        let enc = tok.encode("NAO recebi", true).unwrap();
        assert_eq!(enc.get_tokens().first().map(String::as_str), Some("[CLS]"));
        assert_eq!(enc.get_tokens().last().map(String::as_str), Some("[SEP]"));
        assert!(enc.get_tokens().contains(&"nao".to_string()), "{:?}", enc.get_tokens());
    }

    /// With `morphology` a word is cut before its ending when encoded (not only when the
    /// vocabulary is learnt): `comprei` and `comprar` share their stem; the saved
    /// `tokenizer.json` reads back to the same cuts.
    #[test]
    fn with_morphology_stems_and_endings_are_separate_pieces() {
        let texts: Vec<String> = [
            "Comprei ontem",
            "quero comprar",
            "compraram juntos",
            "comprando agora",
            "a compra",
            "rapidamente",
            "o mar e o ar",
        ]
        .iter()
        .cycle()
        .take(50)
        .map(|s| s.to_string())
        .collect();
        let pieces = |tok: &Tokenizer, text: &str| tok.encode(text, false).unwrap().get_tokens().to_vec();
        let plain = train_tokenizer_on(&texts, 200, 1, false).unwrap();
        assert_eq!(pieces(&plain, "comprei"), ["comprei"]);
        let morph = train_tokenizer_on(&texts, 200, 1, true).unwrap();
        assert_eq!(pieces(&morph, "Comprei"), ["compr", "ei"]);
        assert_eq!(pieces(&morph, "comprar"), ["compr", "ar"]);
        assert_eq!(pieces(&morph, "compraram"), ["compr", "aram"], "the longest ending");
        assert_eq!(pieces(&morph, "compra"), ["compra"], "no ending, not cut");
        assert_eq!(pieces(&morph, "rapidamente"), ["rapida", "mente"]);
        assert_eq!(pieces(&morph, "mar ar"), ["mar", "ar"], "three letters before an ending at least");
        let reloaded = Tokenizer::from_str(&morph.to_string(false).unwrap()).unwrap();
        assert_eq!(pieces(&reloaded, "comprei compraram"), ["compr", "ei", "compr", "aram"]);
    }

    #[test]
    fn same_texts_same_vocabulary() {
        let texts: Vec<String> = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/teste.jsonl"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        let a = train_tokenizer(&texts, 600).unwrap();
        let b = train_tokenizer(&texts, 600).unwrap();
        assert_eq!(a.get_vocab_size(true), 600);
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
    }
}
