//! Prints the prompt tokens tokentop builds for a model and a question (debugging aid).
use tokentop::engine::{gguf::Gguf, template::ChatTemplate, tokenizer::ModelTokenizer};
use tokentop::protocol::{Message, Role};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let g = Gguf::open(std::path::Path::new(&args[1]))?;
    let tok = ModelTokenizer::for_model(&g)?;
    let t = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
    let tmpl = ChatTemplate::new(
        g.get_str("tokenizer.chat_template"),
        &args[1],
        g.architecture()?,
        t(tok.bos),
        t(tok.eos),
    )?;
    let text = tmpl.render(&[Message::new(Role::User, args[2].clone())], true)?;
    let ids = tok.encode(&text)?;
    println!("{text:?}");
    for id in ids {
        print!("{id}:{:?} ", tok.token_text(id).unwrap_or_default());
    }
    println!();
    Ok(())
}
