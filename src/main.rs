use clap::Parser;
use tokentop::cli::{self, Cli, Cmd};

fn main() {
    tokentop::private::hide_panic_messages();
    let args = Cli::parse();
    if args.offline {
        tokentop::offline::force();
    }
    if let Err(e) = real_main(args) {
        eprintln!("tokentop: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(args: Cli) -> anyhow::Result<()> {
    let catalog = cli::load_catalog(args.catalog.as_ref())?;
    match args.command {
        None => cli::ui(catalog, &Default::default()),
        Some(Cmd::Ui(args)) => cli::ui(catalog, &args),
        Some(Cmd::Probe) => cli::probe(),
        Some(Cmd::Bench(b)) => cli::bench(&catalog, &b),
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
