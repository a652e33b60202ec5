use clap::Parser;
use tokentop::cli::{self, Cli, Cmd};

fn main() {
    let args = Cli::parse();
    if let Err(e) = real_main(args) {
        eprintln!("tokentop: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(args: Cli) -> anyhow::Result<()> {
    let catalog = cli::load_catalog(args.catalog.as_ref())?;
    match args.command {
        // The TUI comes with its own issue; until then no arguments means a chat.
        None => cli::run(&catalog, &Default::default()),
        Some(Cmd::Run(run)) => cli::run(&catalog, &run),
        Some(Cmd::Pull { model }) => {
            let path = cli::model_path(&catalog, Some(&model))?;
            println!("{}", path.display());
            Ok(())
        }
        Some(Cmd::List) => {
            cli::list(&catalog);
            Ok(())
        }
    }
}
