//! Local and remote in one backend, for the TUI with `--endpoint`: a `Load` of a GGUF file
//! on disk goes to the embedded engine, a `remote:` name (or any other) to the server; Generate and Cancel
//! go to whichever loaded last. So the switcher and A/B compare a local model with a remote
//! one through the same protocol, and the state machine does not know there are two.

use super::Endpoint;
use crate::engine::worker::EngineHandle;
use crate::protocol::{EngineCmd, EngineEvent};
use std::sync::mpsc::{channel, Receiver, Sender};

/// Spawns the router over a local engine and a remote worker for `ep`.
pub fn spawn(ep: Endpoint) -> EngineHandle {
    let (tx, cmd_rx) = channel::<EngineCmd>();
    let (ev_tx, events) = channel::<EngineEvent>();
    let thread = std::thread::Builder::new()
        .name("tokentop-router".into())
        .spawn(move || {
            let mut local = EngineHandle::spawn();
            let mut remote = super::worker::spawn(ep);
            forward(local.take_events(), ev_tx.clone());
            forward(remote.take_events(), ev_tx);
            let mut use_local = false;
            for cmd in cmd_rx {
                match cmd {
                    EngineCmd::Shutdown => break,
                    EngineCmd::Load { path, opts } => {
                        use_local = super::remote_model(&path).is_none() && path.is_file();
                        let target = if use_local { &local } else { &remote };
                        target.send(EngineCmd::Load { path, opts });
                    }
                    EngineCmd::Cancel { req } => {
                        local.send(EngineCmd::Cancel { req });
                        remote.send(EngineCmd::Cancel { req });
                    }
                    cmd @ EngineCmd::Generate { .. } => {
                        if use_local {
                            local.send(cmd)
                        } else {
                            remote.send(cmd)
                        }
                    }
                }
            }
            // Dropping the handles shuts both workers down.
            drop(local);
            drop(remote);
        })
        .expect("spawning the router thread");
    EngineHandle::from_parts(tx, events, thread)
}

fn forward(from: Receiver<EngineEvent>, to: Sender<EngineEvent>) {
    std::thread::spawn(move || {
        for ev in from {
            if to.send(ev).is_err() {
                return;
            }
        }
    });
}
