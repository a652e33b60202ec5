//! The engine on its own OS thread (candle blocks): commands in, events out. Cancel, Load
//! and Generate are looked at between decode steps, so they act within one token. It holds
//! up to two models: the active one, and for an A/B run the one before it when both fit.

use super::{default_device, DoesNotFit, Engine, Flow, GenEvent};
use crate::protocol::{EngineCmd, EngineEvent, LoadHow, LoadOptions, RequestId};
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

    /// A handle over another worker that speaks the same protocol (the remote backend).
    pub fn from_parts(
        tx: Sender<EngineCmd>,
        events: Receiver<EngineEvent>,
        thread: JoinHandle<()>,
    ) -> Self {
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
/// `read` reads a model from disk: `Engine::load` on the engine's device.
fn load(
    models: &mut Resident,
    path: PathBuf,
    opts: &LoadOptions,
    read: &dyn Fn(&Path, &LoadOptions) -> anyhow::Result<Engine>,
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
    let mut result = guarded(|| read(&path, opts));
    let mut freed_old = None;
    if result.as_ref().is_err_and(|e| e.is::<DoesNotFit>()) && had_old {
        // Both do not fit: free the old weights, then read the new ones.
        freed_old = models.active.take().map(|e| e.info.path.clone());
        how = LoadHow::Swapped;
        result = guarded(|| read(&path, opts));
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
                load(models, old, &opts, read, tx);
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
            EngineCmd::Load { path, opts } => load(
                &mut models,
                path,
                &opts,
                &|p, o| Engine::load(p, o, &device),
                &tx,
            ),
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
    use candle_core::Device;
    use std::cell::Cell;

    /// Loads through `load` with a memory check that says "does not fit" while another model
    /// is resident, as `check_fits` does when two big models exceed available memory; the
    /// models are real (tiny synthetic GGUFs), only the machine's size is made up. Returns the
    /// events, and how many reads were tried.
    fn load_tight(
        models: &mut Resident,
        path: &Path,
        keep_previous: bool,
    ) -> (Vec<EngineEvent>, usize) {
        let (tx, rx) = channel();
        let tries = Cell::new(0);
        let resident = models.active.is_some() as usize + models.spare.is_some() as usize;
        let freed = Cell::new(false);
        let read = |p: &Path, o: &LoadOptions| -> anyhow::Result<Engine> {
            tries.set(tries.get() + 1);
            // The first read finds the old model still in memory; the retry comes after it
            // was freed.
            if resident > 0 && !freed.get() {
                freed.set(true);
                return Err(DoesNotFit("the model needs about 40.0 GB of memory".into()).into());
            }
            Engine::load(p, o, &Device::Cpu)
        };
        let opts = LoadOptions {
            keep_previous,
            ..Default::default()
        };
        load(models, path.to_path_buf(), &opts, &read, &tx);
        drop(tx);
        (rx.iter().collect(), tries.get())
    }

    fn how(events: &[EngineEvent]) -> Vec<(Vec<PathBuf>, LoadHow)> {
        events
            .iter()
            .filter_map(|e| match e {
                EngineEvent::Resident { models, how } => Some((models.clone(), *how)),
                _ => None,
            })
            .collect()
    }

    /// Two models that do not fit together: A/B swaps them (the old one is freed before the
    /// new one is read) and says so; a failed switch then reads the old one back, so a model
    /// is loaded at the end and the events say which.
    #[test]
    fn models_that_do_not_fit_together_are_swapped_and_a_failure_reads_the_old_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.gguf");
        let b = dir.path().join("b.gguf");
        crate::engine::synth::SynthSpec::new("llama")
            .write(&a)
            .unwrap();
        crate::engine::synth::SynthSpec::new("qwen3")
            .write(&b)
            .unwrap();
        let mut models = Resident::default();
        let (ev, tries) = load_tight(&mut models, &a, false);
        assert_eq!(
            (how(&ev), tries),
            (vec![(vec![a.clone()], LoadHow::Fresh)], 1)
        );

        let (ev, tries) = load_tight(&mut models, &b, true);
        assert_eq!(tries, 2, "refused beside A, then read after A was freed");
        assert_eq!(how(&ev), vec![(vec![b.clone()], LoadHow::Swapped)]);
        assert!(matches!(&ev[1], EngineEvent::Ready { info } if info.path == b));

        // A corrupt file that does not fit beside B: B is freed, the file fails, B is read
        // back.
        let bad = dir.path().join("bad.gguf");
        std::fs::write(&bad, b"GGUF\x03\x00\x00\x00 torn").unwrap();
        let (ev, tries) = load_tight(&mut models, &bad, false);
        assert_eq!(tries, 3, "{ev:?}");
        assert_eq!(
            how(&ev),
            vec![
                (vec![], LoadHow::FailedReloadingOld),
                (vec![b.clone()], LoadHow::Fresh)
            ]
        );
        let order: Vec<&str> = ev
            .iter()
            .map(|e| match e {
                EngineEvent::Loading { .. } => "loading",
                EngineEvent::Ready { .. } => "ready",
                EngineEvent::LoadFailed { .. } => "failed",
                EngineEvent::Resident { .. } => "resident",
                _ => "other",
            })
            .collect();
        assert_eq!(
            order,
            ["loading", "failed", "resident", "loading", "ready", "resident"]
        );
        assert!(matches!(&ev[4], EngineEvent::Ready { info } if info.path == b));
        assert_eq!(models.paths(), vec![b]);
    }

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
