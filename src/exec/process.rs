//! Child processes of running nodes: their process groups, so an interrupt can end them, and a reaper that
//! ends them when mpcs itself ends, however it ends.
//!
//! A command runs in its own process group and gets SIGKILL when mpcs dies (`PR_SET_PDEATHSIG`), but that
//! reaches only the command itself: after `kill -9` of mpcs, the `sleep` that `sh -c "sleep 21; ..."` started
//! would be re-parented to init and keep running. Nothing in a killed process runs, so the groups are ended from
//! outside: the first command of a run forks a small reaper that holds the read end of a pipe whose only write
//! end is mpcs's. mpcs tells it each group as it starts (`+pgid`) and ends (`-pgid`); when the pipe reports end
//! of file — mpcs is gone — the reaper kills every group still listed and exits. A process that leaves its group
//! (`setsid`, a daemon) escapes this, as it escapes a terminal's Ctrl-C.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::io::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

#[derive(Default)]
pub struct ProcessRegistry {
    next: AtomicU64,
    pids: Mutex<HashMap<u64, i32>>,
}

impl ProcessRegistry {
    /// Records a started command (the leader of its process group).
    pub fn register(&self, pid: i32) -> u64 {
        reaper_send(b'+', pid);
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = self.pids.lock() {
            p.insert(token, pid);
        }
        token
    }

    /// Forgets a command whose group has ended.
    pub fn unregister(&self, token: u64) {
        let pid = self.pids.lock().ok().and_then(|mut p| p.remove(&token));
        if let Some(pid) = pid {
            reaper_send(b'-', pid);
        }
    }

    /// Sends `signal` to the process group of every registered child.
    pub fn signal_all(&self, signal: i32) {
        if let Ok(p) = self.pids.lock() {
            for &pid in p.values() {
                // SAFETY: kill(2) with a negative pid signals that process group; no memory is touched.
                unsafe {
                    libc::kill(-pid, signal);
                }
            }
        }
    }
}

/// The write end of the reaper's pipe (None where it could not be started: then only the commands themselves
/// die with mpcs, as before).
static REAPER: OnceLock<Option<File>> = OnceLock::new();

fn reaper_send(op: u8, pgid: i32) {
    let Some(pipe) = REAPER.get_or_init(start_reaper) else { return };
    let line = format!("{}{pgid}\n", op as char);
    // One write of a few bytes to a pipe is atomic (< PIPE_BUF), so lines from several threads never mix.
    let _ = (&*pipe).write_all(line.as_bytes());
}

fn start_reaper() -> Option<File> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`. Both are close-on-exec, so no command inherits the write
    // end (which would keep the pipe open after mpcs died).
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: the child runs only async-signal-safe system calls on its own stack data (no allocation, no lock),
    // which is what a fork of a multi-threaded process may do.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: in the forked child; see reaper_main.
        unsafe { reaper_main(fds[0]) }
    }
    // SAFETY: closing our copy of the read end; the write end becomes a File that lives as long as mpcs.
    unsafe { libc::close(fds[0]) };
    if pid < 0 {
        // SAFETY: the write end is ours and unused.
        unsafe { libc::close(fds[1]) };
        return None;
    }
    // SAFETY: fds[1] is an open descriptor that nothing else owns.
    Some(unsafe { File::from_raw_fd(fds[1]) })
}

/// The reaper: reads `+pgid` / `-pgid` lines until end of file, then kills the groups still listed.
///
/// # Safety
/// Only in the child of `fork`, with `read_fd` the read end of the pipe.
unsafe fn reaper_main(read_fd: libc::c_int) -> ! {
    // Its own session: a Ctrl-C or a closed terminal meant for mpcs must not end the reaper first.
    libc::setsid();
    for sig in [libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGTSTP, libc::SIGPIPE] {
        libc::signal(sig, libc::SIG_IGN);
    }
    let mut none: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut none);
    libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    // Keep only the pipe: a copy of mpcs's descriptors would hold its cache locks after it died.
    libc::dup2(read_fd, 0);
    if libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32) != 0 {
        for fd in 1..4096 {
            libc::close(fd);
        }
    }
    let mut groups = [0 as libc::pid_t; 4096];
    let mut live = 0usize;
    let (mut op, mut value) = (0u8, 0 as libc::pid_t);
    let mut buf = [0u8; 512];
    loop {
        let n = libc::read(0, buf.as_mut_ptr() as *mut libc::c_void, buf.len());
        if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
            break;
        }
        for &b in &buf[..n.max(0) as usize] {
            match b {
                b'+' | b'-' => (op, value) = (b, 0),
                b'0'..=b'9' => value = value.saturating_mul(10).saturating_add((b - b'0') as libc::pid_t),
                b'\n' if op == b'+' && live < groups.len() => {
                    groups[live] = value;
                    live += 1;
                }
                b'\n' if op == b'-' => {
                    if let Some(k) = groups[..live].iter().position(|&g| g == value) {
                        live -= 1;
                        groups[k] = groups[live];
                    }
                }
                _ => {}
            }
        }
    }
    for &g in &groups[..live] {
        if g > 1 {
            libc::kill(-g, libc::SIGKILL);
        }
    }
    libc::_exit(0)
}
