//! The engine on its own OS thread (candle blocks): commands in, events out. Cancel, Load
//! and Generate are looked at between decode steps, so they act within one token.

use super::{default_device, Engine, Flow, GenEvent};
use crate::protocol::{EngineCmd, EngineEvent, RequestId};
use std::collections::VecDeque;
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

fn run(rx: Receiver<EngineCmd>, tx: Sender<EngineEvent>) {
    let device = default_device();
    let mut engine: Option<Engine> = None;
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
            EngineCmd::Load { path, opts } => {
                // Free the old weights before reading the new ones.
                engine = None;
                let _ = tx.send(EngineEvent::Loading { path: path.clone() });
                match guarded(|| Engine::load(&path, &opts, &device)) {
                    Ok(e) => {
                        let _ = tx.send(EngineEvent::Ready {
                            info: e.info.clone(),
                        });
                        engine = Some(e);
                    }
                    Err(e) => {
                        let _ = tx.send(EngineEvent::LoadFailed {
                            path,
                            error: format!("{e:#}"),
                        });
                    }
                }
            }
            EngineCmd::Generate {
                req,
                messages,
                params,
            } => {
                let engine_slot = &mut engine;
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
