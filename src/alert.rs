//! The alert state machine: when a run of positive frames becomes an alert, and when it ends.
//!
//! - **Raise** when at least `raise_n` of the last `window_m` frames are positive.
//! - **Clear** after `clear_k` consecutive negative frames, but never less than `min_hold_ms`
//!   after the raise.
//! - The window is emptied when an alert clears, so the frames that raised one alert cannot
//!   raise the next.
//!
//! Consequences (checked by property tests below): a run of `raise_n` consecutive positive
//! frames is always alerted by its last frame (raising never waits on a timer, so no polyp run is
//! suppressed); two alerts start at least `clear_k + raise_n` frames and `min_hold_ms` apart, so
//! the output cannot flap faster than the hysteresis allows; raises and clears alternate.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Alert hysteresis (the `[alert]` table of the daemon config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Positive frames among the last `window_m` needed to raise an alert.
    #[serde(default = "default_raise_n")]
    pub raise_n: usize,
    /// Length of the raising window, in frames.
    #[serde(default = "default_window_m")]
    pub window_m: usize,
    /// Consecutive negative frames that clear an active alert.
    #[serde(default = "default_clear_k")]
    pub clear_k: usize,
    /// An alert stays active at least this long, in milliseconds.
    #[serde(default = "default_min_hold_ms")]
    pub min_hold_ms: u64,
}

fn default_raise_n() -> usize {
    3
}
fn default_window_m() -> usize {
    5
}
fn default_clear_k() -> usize {
    10
}
fn default_min_hold_ms() -> u64 {
    1000
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            raise_n: default_raise_n(),
            window_m: default_window_m(),
            clear_k: default_clear_k(),
            min_hold_ms: default_min_hold_ms(),
        }
    }
}

impl AlertConfig {
    /// Checks ranges; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.raise_n == 0 || self.raise_n > self.window_m {
            return Err(format!(
                "[alert] raise_n = {} must be in 1..=window_m ({})",
                self.raise_n, self.window_m
            ));
        }
        if self.window_m > 1000 {
            return Err(format!(
                "[alert] window_m = {} must be at most 1000",
                self.window_m
            ));
        }
        if self.clear_k == 0 || self.clear_k > 10_000 {
            return Err(format!(
                "[alert] clear_k = {} must be in 1..=10000",
                self.clear_k
            ));
        }
        if self.min_hold_ms > 600_000 {
            return Err(format!(
                "[alert] min_hold_ms = {} must be at most 600000",
                self.min_hold_ms
            ));
        }
        Ok(())
    }
}

/// One alert, from raise to clear.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertEvent {
    /// Alert number since the daemon started (1-based).
    pub id: u64,
    /// Frame sequence number of the raise.
    pub start_seq: u64,
    /// Time of the raise (ms since the stream started).
    pub start_ms: u64,
    /// Frame sequence number of the clear (`None` while active).
    pub end_seq: Option<u64>,
    /// Time of the clear.
    pub end_ms: Option<u64>,
    /// Highest frame score while active.
    pub peak_score: f32,
    /// Frames processed while active.
    pub frames: u64,
    /// Positive frames while active.
    pub positive_frames: u64,
}

/// What a frame changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Nothing changed.
    None,
    /// A new alert started.
    Raised(AlertEvent),
    /// The active alert ended.
    Cleared(AlertEvent),
}

/// The alert state machine.
#[derive(Debug, Clone)]
pub struct AlertMachine {
    cfg: AlertConfig,
    window: VecDeque<bool>,
    active: Option<AlertEvent>,
    negatives: usize,
    next_id: u64,
}

impl AlertMachine {
    /// A machine with no alert active.
    pub fn new(cfg: AlertConfig) -> Self {
        AlertMachine {
            window: VecDeque::with_capacity(cfg.window_m),
            cfg,
            active: None,
            negatives: 0,
            next_id: 1,
        }
    }

    /// The active alert, if any.
    pub fn active(&self) -> Option<&AlertEvent> {
        self.active.as_ref()
    }

    /// Ends the active alert now (shutdown, or a feed that died), whatever the hysteresis, and
    /// empties the raising window; `None` when no alert is active.
    pub fn close(&mut self, seq: u64, t_ms: u64) -> Option<AlertEvent> {
        let mut a = self.active.take()?;
        a.end_seq = Some(seq);
        a.end_ms = Some(t_ms);
        self.window.clear();
        self.negatives = 0;
        Some(a)
    }

    /// Changes the hysteresis (on reload), keeping the active alert.
    pub fn reconfigure(&mut self, cfg: AlertConfig) {
        while self.window.len() > cfg.window_m {
            self.window.pop_front();
        }
        self.cfg = cfg;
    }

    /// Feeds one processed frame.
    pub fn update(&mut self, seq: u64, t_ms: u64, positive: bool, score: f32) -> Transition {
        if self.window.len() == self.cfg.window_m {
            self.window.pop_front();
        }
        self.window.push_back(positive);
        if let Some(a) = &mut self.active {
            a.frames += 1;
            a.peak_score = a.peak_score.max(score);
            if positive {
                a.positive_frames += 1;
                self.negatives = 0;
            } else {
                self.negatives += 1;
            }
            if self.negatives >= self.cfg.clear_k
                && t_ms.saturating_sub(a.start_ms) >= self.cfg.min_hold_ms
            {
                let mut done = self.active.take().expect("active");
                done.end_seq = Some(seq);
                done.end_ms = Some(t_ms);
                self.window.clear();
                self.negatives = 0;
                return Transition::Cleared(done);
            }
            return Transition::None;
        }
        if self.window.iter().filter(|p| **p).count() >= self.cfg.raise_n {
            let a = AlertEvent {
                id: self.next_id,
                start_seq: seq,
                start_ms: t_ms,
                end_seq: None,
                end_ms: None,
                peak_score: score,
                frames: 1,
                positive_frames: u64::from(positive),
            };
            self.next_id += 1;
            self.negatives = 0;
            self.active = Some(a.clone());
            return Transition::Raised(a);
        }
        Transition::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FRAME_MS: u64 = 40;

    fn run(cfg: &AlertConfig, frames: &[(bool, f32)]) -> (Vec<Transition>, Vec<bool>) {
        let mut m = AlertMachine::new(cfg.clone());
        let mut ts = Vec::new();
        let mut active = Vec::new();
        for (i, &(p, s)) in frames.iter().enumerate() {
            ts.push(m.update(i as u64, i as u64 * FRAME_MS, p, s));
            active.push(m.active().is_some());
        }
        (ts, active)
    }

    #[test]
    fn raise_and_clear_by_hand() {
        let cfg = AlertConfig {
            raise_n: 2,
            window_m: 3,
            clear_k: 2,
            min_hold_ms: 0,
        };
        let f = |p: bool| (p, if p { 0.9 } else { 0.1 });
        let frames: Vec<_> = [false, true, false, true, true, false, false, false]
            .into_iter()
            .map(f)
            .collect();
        let (ts, active) = run(&cfg, &frames);
        assert_eq!(
            active,
            [false, false, false, true, true, true, false, false]
        );
        match &ts[3] {
            Transition::Raised(a) => assert_eq!((a.id, a.start_seq), (1, 3)),
            t => panic!("{t:?}"),
        }
        match &ts[6] {
            Transition::Cleared(a) => {
                assert_eq!((a.end_seq, a.frames, a.positive_frames), (Some(6), 4, 2));
                assert!((a.peak_score - 0.9).abs() < 1e-6);
            }
            t => panic!("{t:?}"),
        }
    }

    #[test]
    fn min_hold_keeps_a_short_alert_active() {
        let cfg = AlertConfig {
            raise_n: 1,
            window_m: 1,
            clear_k: 1,
            min_hold_ms: 200,
        };
        let frames = [
            (true, 0.9),
            (false, 0.0),
            (false, 0.0),
            (false, 0.0),
            (false, 0.0),
            (false, 0.0),
        ];
        let (_, active) = run(&cfg, &frames);
        // Raised at 0 ms; negatives from 40 ms; cleared at the first frame >= 200 ms.
        assert_eq!(active, [true, true, true, true, true, false]);
    }

    fn configs() -> impl Strategy<Value = AlertConfig> {
        (1usize..6, 0usize..6, 1usize..12, 0u64..400).prop_map(|(n, extra, k, hold)| AlertConfig {
            raise_n: n,
            window_m: n + extra,
            clear_k: k,
            min_hold_ms: hold,
        })
    }

    proptest! {
        #[test]
        fn no_run_of_raise_n_positives_goes_unalerted(
            cfg in configs(),
            frames in prop::collection::vec((any::<bool>(), 0.0f32..1.0), 1..300),
        ) {
            let (_, active) = run(&cfg, &frames);
            let mut streak = 0;
            for (i, (p, _)) in frames.iter().enumerate() {
                streak = if *p { streak + 1 } else { 0 };
                if streak >= cfg.raise_n {
                    prop_assert!(active[i], "frame {i}: {streak} positives in a row, no alert");
                }
            }
        }

        #[test]
        fn alerts_alternate_and_do_not_flap(
            cfg in configs(),
            frames in prop::collection::vec((any::<bool>(), 0.0f32..1.0), 1..300),
        ) {
            let (ts, _) = run(&cfg, &frames);
            let mut active = false;
            let mut last_start: Option<u64> = None;
            for (i, t) in ts.iter().enumerate() {
                match t {
                    Transition::Raised(a) => {
                        prop_assert!(!active);
                        if let Some(prev) = last_start {
                            prop_assert!(i as u64 - prev >= (cfg.clear_k + cfg.raise_n) as u64);
                            prop_assert!((i as u64 - prev) * FRAME_MS >= cfg.min_hold_ms);
                        }
                        last_start = Some(a.start_seq);
                        active = true;
                    }
                    Transition::Cleared(a) => {
                        prop_assert!(active);
                        prop_assert!(a.end_ms.unwrap() - a.start_ms >= cfg.min_hold_ms);
                        let peak = frames[a.start_seq as usize..=i]
                            .iter()
                            .map(|f| f.1)
                            .fold(0.0f32, f32::max);
                        prop_assert!((a.peak_score - peak).abs() < 1e-6);
                        active = false;
                    }
                    Transition::None => {}
                }
            }
        }
    }
}
