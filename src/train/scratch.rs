//! `--base none`: a WordPiece tokenizer trained on the training texts and a
//! small BERT configuration, for training without any pretrained checkpoint.

use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer,
    TokenizerBuilder,
};

/// Special tokens, in id order: `[PAD]` is 0, as `pad_token_id` says.
const SPECIAL: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Trains an uncased, accent-stripping WordPiece tokenizer of at most `vocab_size` entries.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<Tokenizer, String> {
    let trainer = WordPieceTrainerBuilder::default()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(SPECIAL.iter().map(|t| AddedToken::from(*t, true)).collect())
        .build();
    let mut tokenizer: Tokenizer = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
        .with_model(WordPiece::default().into())
        .with_normalizer(Some(BertNormalizer::new(true, true, Some(true), true).into()))
        .with_pre_tokenizer(Some(BertPreTokenizer.into()))
        .with_post_processor(None)
        .with_decoder(Some(WordPieceDecoder::default().into()))
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let mut trainer = TrainerWrapper::WordPieceTrainer(trainer);
    tokenizer.train(&mut trainer, texts.iter()).map_err(|e| e.to_string())?;
    let id = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| format!("trained vocabulary lacks {t}"));
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    tokenizer.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
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
}
