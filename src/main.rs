use clap::error::ErrorKind;
use clap::Parser;
use std::io::Write;
use tokentop::cli::{self, Cli, Cmd, QuietExit};

/// Every error is one line on stderr, `tokentop: error: …`, with exit status 1: bad values
/// and usage errors from clap too (not clap's usage block and status 2). A signal or a
/// closed stdout ends tokentop quietly with 128 + the signal's number.
fn main() {
    tokentop::private::hide_panic_messages();
    let args = match Cli::try_parse() {
        Ok(args) => args,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => fail(&cli::clap_error_line(&e)),
        },
    };
    if args.offline {
        tokentop::offline::force();
    }
    if let Err(e) = real_main(args) {
        if let Some(QuietExit(code)) = e.downcast_ref::<QuietExit>() {
            std::process::exit(*code);
        }
        fail(&format!("{e:#}"));
    }
}

fn fail(message: &str) -> ! {
    // writeln! rather than eprintln!, which panics when stderr is closed.
    let _ = writeln!(
        std::io::stderr(),
        "tokentop: error: {}",
        message.replace('\n', " ")
    );
    std::process::exit(1);
}

fn real_main(args: Cli) -> anyhow::Result<()> {
    let catalog = cli::load_catalog(args.catalog.as_ref())?;
    match args.command {
        None => cli::ui(catalog, &Default::default()),
        Some(Cmd::Ui(args)) => cli::ui(catalog, &args),
        Some(Cmd::Probe) => cli::probe(),
        Some(Cmd::Bench(b)) => cli::bench(&catalog, &b),
        Some(Cmd::Perplexity(p)) => cli::perplexity(&catalog, &p),
        Some(Cmd::Run(run)) => cli::run(&catalog, &run),
        Some(Cmd::Pull { model }) => {
            let path = cli::model_path(&catalog, Some(&model))?;
            cli::print_out(&format!("{}\n", path.display()))
        }
        Some(Cmd::List) => cli::list(&catalog),
        Some(Cmd::Top(t)) => {
            let urls = if t.urls.is_empty() {
                vec!["http://127.0.0.1:8080".to_string()]
            } else {
                t.urls
            };
            tokentop::top::run(&urls, t.batch, t.iterations)
        }
    }
}
