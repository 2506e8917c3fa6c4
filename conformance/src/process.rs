//! Child processes a test (or an example) starts, reads and kills: the
//! harness [`members`](crate::members) runs its member processes with,
//! and what any other multi-process check (the `order_service` example)
//! reuses instead of writing its own. It owns the processes it spawns and
//! nothing else: it kills and reaps every one still running when it is
//! dropped, so no child outlives its test, passed or failed.
//!
//! A child talks through its stdout, one line per event; every complete
//! line arrives on one channel with the child's number and when it came
//! (a line cut by a kill, without its newline, is dropped: it says
//! nothing). Its stderr is kept for failure messages. Its stdin is a pipe
//! the parent may write to ([`Processes::tell`]) or close; a child that
//! exits when its stdin ends goes when the parent dies.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One complete line a child printed.
#[derive(Debug, Clone)]
pub struct Line {
    /// The child's number (in spawn order, from 0).
    pub child: usize,
    /// When it arrived, from the harness's start.
    pub at: Duration,
    /// The line, without its newline.
    pub text: String,
}

/// The running children (see the module docs).
pub struct Processes {
    children: Vec<Option<Child>>,
    stdins: Vec<Option<ChildStdin>>,
    stderr: Vec<Arc<Mutex<String>>>,
    readers: Vec<JoinHandle<()>>,
    tx: Option<mpsc::Sender<Line>>,
    lines: mpsc::Receiver<Line>,
    start: Instant,
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Processes {
    /// No children yet; times are counted from `start`.
    pub fn new(start: Instant) -> Processes {
        let (tx, lines) = mpsc::channel();
        Processes {
            children: Vec::new(),
            stdins: Vec::new(),
            stderr: Vec::new(),
            readers: Vec::new(),
            tx: Some(tx),
            lines,
            start,
        }
    }

    /// Start `command` with its stdin, stdout and stderr piped; returns
    /// its number.
    ///
    /// # Panics
    /// If the process cannot be started, or after [`Processes::drain`].
    pub fn spawn(&mut self, mut command: Command) -> usize {
        let id = self.children.len();
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn child {id}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        self.stdins.push(child.stdin.take());
        self.children.push(Some(child));
        let tx = self.tx.clone().expect("spawn after drain");
        let start = self.start;
        self.readers.push(std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    // A line cut by the kill (no newline) says nothing.
                    Ok(_) if buf.last() != Some(&b'\n') => break,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&buf[..buf.len() - 1]).into_owned();
                let line = Line {
                    child: id,
                    at: start.elapsed(),
                    text,
                };
                if tx.send(line).is_err() {
                    break;
                }
            }
        }));
        let log = Arc::new(Mutex::new(String::new()));
        self.stderr.push(log.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut log) = log.lock() {
                    log.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        id
    }

    /// How many children were spawned.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether none was spawned.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Whether child `id` was neither killed nor found exited.
    pub fn alive(&self, id: usize) -> bool {
        self.children.get(id).is_some_and(Option::is_some)
    }

    /// The next line within `wait`, if one comes.
    pub fn recv_timeout(&self, wait: Duration) -> Option<Line> {
        self.lines.recv_timeout(wait).ok()
    }

    /// A line that has already arrived, if any.
    pub fn try_recv(&self) -> Option<Line> {
        self.lines.try_recv().ok()
    }

    /// SIGKILL child `id` and reap it; returns when (from the start), or
    /// `None` if it was already gone. Its stdin is closed.
    pub fn kill(&mut self, id: usize) -> Option<Duration> {
        let mut child = self.children.get_mut(id)?.take()?;
        let at = self.start.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        self.stdins[id] = None;
        Some(at)
    }

    /// Write `line` (a newline is added) to child `id`'s stdin; false if
    /// it is closed or the child is gone.
    pub fn tell(&mut self, id: usize, line: &str) -> bool {
        match self.stdins.get_mut(id).and_then(Option::as_mut) {
            Some(stdin) => stdin
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|()| stdin.flush())
                .is_ok(),
            None => false,
        }
    }

    /// Close child `id`'s stdin (a child that reads it sees EOF).
    pub fn close_stdin(&mut self, id: usize) {
        if let Some(s) = self.stdins.get_mut(id) {
            *s = None;
        }
    }

    /// Child `id`'s exit status if it has exited (it is then reaped and
    /// no longer [`alive`](Processes::alive)); `None` while it runs or if
    /// it is gone already.
    pub fn try_wait(&mut self, id: usize) -> Option<ExitStatus> {
        let slot = self.children.get_mut(id)?;
        let status = slot.as_mut()?.try_wait().ok()??;
        *slot = None;
        self.stdins[id] = None;
        Some(status)
    }

    /// Every line still to come, once every child is gone (killed, or
    /// exited and reaped): waits for the readers to reach their children's
    /// EOF. No child may be spawned afterwards.
    pub fn drain(&mut self) -> Vec<Line> {
        self.tx = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.lines.try_iter().collect()
    }

    /// The last `chars` characters of child `id`'s stderr so far.
    pub fn stderr_tail(&self, id: usize, chars: usize) -> String {
        let log = self
            .stderr
            .get(id)
            .and_then(|l| l.lock().ok().map(|l| l.clone()))
            .unwrap_or_default();
        let skip = log.chars().count().saturating_sub(chars);
        log.chars().skip(skip).collect()
    }

    /// The end of every child's stderr so far, for a failure message.
    pub fn stderr_tails(&self) -> String {
        let mut out = String::new();
        for id in 0..self.stderr.len() {
            let tail = self.stderr_tail(id, 1500);
            if !tail.trim().is_empty() {
                out.push_str(&format!("--- child {id} stderr (tail):\n{tail}\n"));
            }
        }
        out
    }
}
