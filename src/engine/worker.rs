//! The engine on its own OS thread (candle blocks): commands in, events out. Cancel, Load
//! and Generate are looked at between decode steps, so they act within one token. It holds
//! up to two models: the active one, and for an A/B run the one before it when both fit.

use super::{default_device, DoesNotFit, Engine, Flow, GenEvent};
use crate::protocol::{EngineCmd, EngineEvent, LoadHow, LoadOptions, RequestId};
use candle_core::Device;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;

/// Owns the engine thread and the sender of its commands.
pub struct EngineHandle {
    tx: Sender<EngineCmd>,
    pub events: Receiver<EngineEvent>,
    thread: Option<JoinHandle<()>>,
}

impl EngineHandle {
    pub fn spawn() -> Self {
        let (tx, cmd_rx) = channel();
        let (ev_tx, events) = channel();
        let thread = std::thread::Builder::new()
            .name("tokentop-engine".into())
            .spawn(move || run(cmd_rx, ev_tx))
            .expect("spawning the engine thread");
        Self {
            tx,
            events,
            thread: Some(thread),
        }
    }

    pub fn send(&self, cmd: EngineCmd) {
        // The thread only ends on Shutdown or a dropped handle; a send after that is moot.
        let _ = self.tx.send(cmd);
    }

    /// Takes the event receiver, for a loop that polls it apart from the handle.
    pub fn take_events(&mut self) -> Receiver<EngineEvent> {
        std::mem::replace(&mut self.events, channel().1)
    }

    /// A sender for other threads (a Ctrl-C handler, say).
    pub fn sender(&self) -> Sender<EngineCmd> {
        self.tx.clone()
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(EngineCmd::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The models the engine holds: the one answering, and the one loaded before it when an A/B
/// run keeps both resident (at most two, so memory is bounded).
#[derive(Default)]
struct Resident {
    active: Option<Engine>,
    spare: Option<Engine>,
}

impl Resident {
    fn paths(&self) -> Vec<PathBuf> {
        self.active
            .iter()
            .chain(self.spare.iter())
            .map(|e| e.info.path.clone())
            .collect()
    }
}

/// Whether two paths name the same file (as given, or once resolved).
fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Loads `path` as the active model. A resident model is switched to without reading it
/// again. Otherwise the new one is read while the old one stays loaded; when the two do not
/// fit together ([`DoesNotFit`]) the old one is freed first, and if the new one then fails,
/// the old one is read again, so a failed switch never leaves the user without the model
/// they had. Ends with `Ready`/`LoadFailed` and a `Resident` saying what happened.
fn load(
    models: &mut Resident,
    path: PathBuf,
    opts: &LoadOptions,
    device: &Device,
    tx: &Sender<EngineEvent>,
) {
    let send = |ev| {
        let _ = tx.send(ev);
    };
    send(EngineEvent::Loading { path: path.clone() });
    let reused = if models
        .active
        .as_ref()
        .is_some_and(|e| same_file(&e.info.path, &path))
    {
        true
    } else if models
        .spare
        .as_ref()
        .is_some_and(|e| same_file(&e.info.path, &path))
    {
        std::mem::swap(&mut models.active, &mut models.spare);
        true
    } else {
        false
    };
    if reused {
        if !opts.keep_previous {
            models.spare = None;
        }
        let mut info = models.active.as_ref().expect("resident").info.clone();
        info.load_time = std::time::Duration::ZERO;
        send(EngineEvent::Ready { info });
        send(EngineEvent::Resident {
            models: models.paths(),
            how: LoadHow::Reused,
        });
        return;
    }
    // At most two resident: the one loaded before the active one goes now.
    models.spare = None;
    let had_old = models.active.is_some();
    let mut how = if had_old {
        LoadHow::BesideOld
    } else {
        LoadHow::Fresh
    };
    let mut result = guarded(|| Engine::load(&path, opts, device));
    let mut freed_old = None;
    if result.as_ref().is_err_and(|e| e.is::<DoesNotFit>()) && had_old {
        // Both do not fit: free the old weights, then read the new ones.
        freed_old = models.active.take().map(|e| e.info.path.clone());
        how = LoadHow::Swapped;
        result = guarded(|| Engine::load(&path, opts, device));
    }
    match result {
        Ok(e) => {
            send(EngineEvent::Ready {
                info: e.info.clone(),
            });
            let old = models.active.replace(e);
            if opts.keep_previous {
                models.spare = old;
            }
            send(EngineEvent::Resident {
                models: models.paths(),
                how,
            });
        }
        Err(e) => {
            send(EngineEvent::LoadFailed {
                path,
                error: format!("{e:#}"),
            });
            let how = match (&freed_old, &models.active) {
                (Some(_), _) => LoadHow::FailedReloadingOld,
                (None, Some(_)) => LoadHow::FailedKeptOld,
                (None, None) => LoadHow::FailedNone,
            };
            send(EngineEvent::Resident {
                models: models.paths(),
                how,
            });
            if let Some(old) = freed_old {
                let opts = LoadOptions {
                    keep_previous: false,
                    ..opts.clone()
                };
                load(models, old, &opts, device, tx);
            }
        }
    }
}

fn run(rx: Receiver<EngineCmd>, tx: Sender<EngineEvent>) {
    let device = default_device();
    let mut models = Resident::default();
    let mut pending: VecDeque<EngineCmd> = VecDeque::new();
    loop {
        let cmd = match pending.pop_front() {
            Some(c) => c,
            None => match rx.recv() {
                Ok(c) => c,
                Err(_) => return,
            },
        };
        match cmd {
            EngineCmd::Shutdown => return,
            EngineCmd::Cancel { .. } => {}
            EngineCmd::Load { path, opts } => load(&mut models, path, &opts, &device, &tx),
            EngineCmd::Generate {
                req,
                messages,
                params,
            } => {
                let engine_slot = &mut models.active;
                let Some(engine) = engine_slot.as_mut() else {
                    let _ = tx.send(EngineEvent::Failed {
                        req,
                        error: "no model is loaded".into(),
                    });
                    continue;
                };
                let result = guarded(|| {
                    engine.generate(&messages, &params, |ev| {
                        let _ = tx.send(match ev {
                            GenEvent::Prefilled {
                                prompt_tokens,
                                cached_tokens,
                                ttft,
                                kv_bytes,
                            } => EngineEvent::Prefilled {
                                req,
                                prompt_tokens,
                                cached_tokens,
                                ttft,
                                kv_bytes,
                            },
                            GenEvent::Token(text) => EngineEvent::Token {
                                req,
                                text: text.to_string(),
                            },
                        });
                        interrupted(&rx, &mut pending, req)
                    })
                });
                if result.as_ref().is_err_and(|e| e.is::<Crash>()) {
                    // A panic may have left the cache or weights half-updated.
                    *engine_slot = None;
                }
                let _ = tx.send(match result {
                    Ok((stats, reason)) => EngineEvent::Finished { req, stats, reason },
                    Err(e) => EngineEvent::Failed {
                        req,
                        error: format!("{e:#}"),
                    },
                });
            }
        }
    }
}

/// A panic inside the engine (a bug, or a bad input no check caught): caught so that it
/// becomes a `LoadFailed`/`Failed` the UI shows, and the thread lives on for the next Load.
#[derive(Debug)]
struct Crash(String);

impl std::fmt::Display for Crash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the engine crashed ({}); load the model again (this is a tokentop bug, please report it)",
            self.0
        )
    }
}

impl std::error::Error for Crash {}

fn guarded<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            let line = msg.lines().next().unwrap_or("panic").to_string();
            Err(Crash(line).into())
        }
    }
}

/// Drains commands that arrived mid-answer: a Cancel of this request, or any command that
/// needs the engine (Load, Generate, Shutdown), stops it; the latter run next.
fn interrupted(
    rx: &Receiver<EngineCmd>,
    pending: &mut VecDeque<EngineCmd>,
    req: RequestId,
) -> Flow {
    let mut flow = Flow::Continue;
    loop {
        match rx.try_recv() {
            Ok(EngineCmd::Cancel { req: r }) => {
                if r == req {
                    flow = Flow::Stop;
                }
            }
            Ok(other) => {
                pending.push_back(other);
                flow = Flow::Stop;
            }
            Err(TryRecvError::Empty) => return flow,
            Err(TryRecvError::Disconnected) => return Flow::Stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_one_line_crash_error() {
        let err = guarded(|| -> anyhow::Result<()> { panic!("index out of bounds\nsecond line") })
            .unwrap_err();
        assert!(err.is::<Crash>());
        assert_eq!(
            err.to_string(),
            "the engine crashed (index out of bounds); load the model again (this is a tokentop bug, please report it)"
        );
        let owned = guarded(|| -> anyhow::Result<()> { panic!("{}", 7) }).unwrap_err();
        assert!(
            owned.to_string().starts_with("the engine crashed (7)"),
            "{owned}"
        );
        assert_eq!(guarded(|| Ok(5)).unwrap(), 5);
    }
}
