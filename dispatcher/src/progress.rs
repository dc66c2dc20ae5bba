//! The progress display of `dispatcher submit --wait` (issue 13): one line per phase of the request,
//! queued (with its queue position), started, each denoising step with a bar, uploading, and the end.
//!
//! On a terminal the line is redrawn in place (`\r` and erase-line); elsewhere (a pipe, a log file, the
//! tests) every change is one line of its own, so scripts can read the phases. A phase equal to the one
//! shown is not drawn again.

use std::io::{self, Write};

/// What the request is doing, as the stream tells it.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Waiting for a worker; `position` requests of its kind are ahead (0 = next).
    Queued {
        position: usize,
    },
    Started {
        worker: String,
    },
    Step {
        step: u32,
        total: u32,
    },
    /// The last step is done: safety check, encoding and upload until `completed`.
    Uploading,
    Completed {
        seconds: f64,
        inference: f64,
    },
    Failed {
        error_type: String,
        error: String,
    },
}

/// Width of the step bar in characters.
const BAR: usize = 24;

impl Phase {
    pub fn line(&self) -> String {
        match self {
            Phase::Queued { position: 0 } => "queued: position 0 (next)".into(),
            Phase::Queued { position } => format!("queued: position {position} ({position} ahead)"),
            Phase::Started { worker } => format!("started on {worker}"),
            Phase::Step { step, total } => {
                let filled = if *total == 0 {
                    BAR
                } else {
                    (*step as usize * BAR / *total as usize).min(BAR)
                };
                format!(
                    "step {step}/{total} [{}{}]",
                    "#".repeat(filled),
                    ".".repeat(BAR - filled)
                )
            }
            Phase::Uploading => "uploading: safety check, encoding, storing the images".into(),
            Phase::Completed { seconds, inference } => {
                format!("completed in {seconds:.2} s (inference {inference:.2} s)")
            }
            Phase::Failed { error_type, error } => format!("failed ({error_type}): {error}"),
        }
    }

    fn is_last(&self) -> bool {
        matches!(self, Phase::Completed { .. } | Phase::Failed { .. })
    }
}

/// Draws phases on `out` (stderr in the binary).
pub struct ProgressDisplay<'a> {
    out: &'a mut (dyn Write + Send),
    /// Redraw one line in place instead of printing a line per phase.
    tty: bool,
    shown: Option<Phase>,
}

impl<'a> ProgressDisplay<'a> {
    pub fn new(out: &'a mut (dyn Write + Send), tty: bool) -> Self {
        ProgressDisplay {
            out,
            tty,
            shown: None,
        }
    }

    pub fn show(&mut self, phase: Phase) -> io::Result<()> {
        if self.shown.as_ref() == Some(&phase) {
            return Ok(());
        }
        let line = phase.line();
        if self.tty {
            write!(self.out, "\r\x1b[2K{line}")?;
            if phase.is_last() {
                writeln!(self.out)?;
            }
        } else {
            writeln!(self.out, "{line}")?;
        }
        self.out.flush()?;
        self.shown = Some(phase);
        Ok(())
    }

    /// A message on a line of its own (a download, a validation detail), below the phase line.
    pub fn message(&mut self, text: &str) -> io::Result<()> {
        if self.tty && self.shown.as_ref().is_some_and(|p| !p.is_last()) {
            writeln!(self.out)?;
            self.shown = None;
        }
        writeln!(self.out, "{text}")?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(tty: bool, phases: &[Phase]) -> String {
        let mut buf = Vec::new();
        {
            let mut d = ProgressDisplay::new(&mut buf, tty);
            for p in phases {
                d.show(p.clone()).expect("write");
            }
        }
        String::from_utf8(buf).expect("utf-8")
    }

    #[test]
    fn a_pipe_gets_one_line_per_change() {
        let text = draw(
            false,
            &[
                Phase::Queued { position: 2 },
                Phase::Queued { position: 2 },
                Phase::Queued { position: 0 },
                Phase::Step { step: 1, total: 4 },
                Phase::Step { step: 4, total: 4 },
                Phase::Uploading,
            ],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "queued: position 2 (2 ahead)",
                "queued: position 0 (next)",
                "step 1/4 [######..................]",
                "step 4/4 [########################]",
                "uploading: safety check, encoding, storing the images",
            ]
        );
    }

    #[test]
    fn a_terminal_gets_one_line_redrawn() {
        let text = draw(
            true,
            &[
                Phase::Step { step: 1, total: 2 },
                Phase::Completed {
                    seconds: 1.0,
                    inference: 0.5,
                },
            ],
        );
        assert_eq!(
            text,
            "\r\x1b[2Kstep 1/2 [############............]\
             \r\x1b[2Kcompleted in 1.00 s (inference 0.50 s)\n"
        );
    }
}
