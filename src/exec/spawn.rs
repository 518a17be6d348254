//! Starting a node's command cheaply, in its own process group, dying with mpcs.
//!
//! `std::process::Command` with a `pre_exec` hook has to `fork`, which copies mpcs's page tables: its cost grows
//! with mpcs's memory (0.7 ms at 1 MB, 1.4–1.7 ms at 25 MB, several times more on a loaded machine), and on a
//! 1,760-node DAG of small commands that made mpcs ~20 % slower than GNU make. Without the hook std uses
//! `posix_spawn` (no copy), but then the child cannot ask for `PR_SET_PDEATHSIG`. So this does what
//! `posix_spawn` does — `clone(CLONE_VM | CLONE_VFORK)` on a small stack of its own, the parent suspended
//! until the child has exec'd — and the child makes the calls `posix_spawn` cannot: its own process group
//! (Ctrl-C reaches mpcs first, and mpcs ends the whole group) and SIGKILL when the spawning thread dies
//! (`kill -9` of mpcs takes the command with it). Everything the child needs is prepared by the parent; the
//! child only makes raw system calls.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

/// A command to start: program, arguments, working directory, environment changes, and the log that
/// receives its stdout and stderr (stdin is /dev/null).
pub struct SpawnRequest<'a> {
    pub argv: &'a [String],
    pub cwd: &'a Path,
    pub env: Vec<(OsString, OsString)>,
    pub log: &'a std::fs::File,
}

/// What the child needs, prepared before `clone`: pointers into these stay valid until it has exec'd.
struct ChildPlan {
    program: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    stdin: libc::c_int,
    log: libc::c_int,
    /// The old signal mask, restored just before exec.
    mask: libc::sigset_t,
    /// Written by the child (shared memory) when it fails before exec.
    errno: libc::c_int,
}

/// Starts the command; returns its pid.
pub fn spawn(req: &SpawnRequest<'_>) -> io::Result<libc::pid_t> {
    let program = find_program(&req.argv[0])?;
    let cstr = |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| io::Error::other("a NUL byte in an argument"));
    let args: Vec<CString> = req.argv.iter().map(|a| cstr(OsStr::new(a))).collect::<io::Result<_>>()?;
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    for (k, v) in &req.env {
        vars.retain(|(ek, _)| ek != k);
        vars.push((k.clone(), v.clone()));
    }
    let env: Vec<CString> = vars
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            cstr(&kv)
        })
        .collect::<io::Result<_>>()?;
    let null = std::fs::File::open("/dev/null")?;
    let mut plan = ChildPlan {
        program: cstr(program.as_os_str())?,
        argv: args.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect(),
        envp: env.iter().map(|e| e.as_ptr()).chain([std::ptr::null()]).collect(),
        cwd: cstr(req.cwd.as_os_str())?,
        stdin: null.as_raw_fd(),
        log: req.log.as_raw_fd(),
        // SAFETY: an all-zero sigset_t is a valid (empty) set; it is overwritten below.
        mask: unsafe { std::mem::zeroed() },
        errno: 0,
    };
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: all signals are blocked around clone so no handler of mpcs runs on the child's stack; the child
    // runs `child_main` on `stack` (which outlives it: CLONE_VFORK suspends us until it has exec'd or exited)
    // and touches only `plan`, which stays alive and unmoved until then.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut plan.mask);
        let top = stack.as_mut_ptr().add(stack.len()) as *mut libc::c_void;
        let top = ((top as usize) & !15) as *mut libc::c_void;
        let pid = libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut plan as *mut ChildPlan as *mut libc::c_void,
        );
        libc::pthread_sigmask(libc::SIG_SETMASK, &plan.mask, std::ptr::null_mut());
        pid
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if plan.errno != 0 {
        // The child failed before exec and has exited: reap it.
        let _ = wait(pid);
        return Err(io::Error::from_raw_os_error(plan.errno));
    }
    Ok(pid)
}

/// The child side: raw system calls only, then exec.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildPlan`, alive and unmoved while the parent is suspended (CLONE_VFORK).
    unsafe {
        let plan = &mut *(arg as *mut ChildPlan);
        let fail = |plan: &mut ChildPlan| -> libc::c_int {
            plan.errno = *libc::__errno_location();
            libc::_exit(127)
        };
        if libc::setpgid(0, 0) != 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return fail(plan);
        }
        if libc::dup2(plan.stdin, 0) < 0 || libc::dup2(plan.log, 1) < 0 || libc::dup2(plan.log, 2) < 0 {
            return fail(plan);
        }
        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            return fail(plan);
        }
        // mpcs's handlers (Ctrl-C) must not run here; exec resets handled signals, ignored ones stay ignored.
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_DFL);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &plan.mask, std::ptr::null_mut());
        libc::execve(plan.program.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        fail(plan)
    }
}

/// Waits for the command `pid` to end, then kills what it left running in its process group (a `cmd &` the
/// shell did not wait for): a node's processes end with the node. The group is killed while the command is
/// still an unreaped zombie, so its id cannot have been reused by an unrelated process.
pub fn wait_group(pid: libc::pid_t) -> io::Result<ExitStatus> {
    loop {
        // SAFETY: waitid with WNOWAIT only reports that `pid` exited; `info` is written by the kernel.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // SAFETY: signals the process group led by our own (zombie) child.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    wait(pid)
}

/// Waits for `pid` to end.
pub fn wait(pid: libc::pid_t) -> io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes only `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The program's path: as written when it holds a `/`, else the first executable file of that name on PATH.
fn find_program(name: &str) -> io::Result<PathBuf> {
    if name.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the program name is empty"));
    }
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, "not found on PATH"))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(argv: &[&str], env: Vec<(OsString, OsString)>) -> (io::Result<ExitStatus>, String) {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("log");
        let log = std::fs::File::create(&log_path).unwrap();
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let r = spawn(&SpawnRequest { argv: &argv, cwd: dir.path(), env, log: &log }).and_then(wait);
        // The folder's real path first, then what the command wrote.
        let cwd = dir.path().canonicalize().unwrap().display().to_string();
        (r, format!("{cwd}\n{}", std::fs::read_to_string(&log_path).unwrap()))
    }

    #[test]
    fn runs_in_its_own_group_in_the_given_folder_with_the_environment() {
        let env = vec![("MPCS_TEST_VAR".into(), "hello".into())];
        let (status, log) = run(&["sh", "-c", "echo $MPCS_TEST_VAR; pwd; ps -o pgid= -p $$; echo $$; exit 3"], env);
        assert_eq!(status.unwrap().code(), Some(3));
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines[1], "hello");
        assert_eq!(lines[2], lines[0], "the command runs in the folder it was given");
        assert_eq!(lines[3].trim(), lines[4].trim(), "the command leads its own process group");
    }

    #[test]
    fn a_missing_program_is_an_error_not_a_hang() {
        let (status, _) = run(&["no-such-program-mpcs"], Vec::new());
        assert_eq!(status.unwrap_err().kind(), io::ErrorKind::NotFound);
        let (status, _) = run(&["/nonexistent/prog"], Vec::new());
        assert_eq!(status.unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn signals_end_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let argv = vec!["sleep".to_string(), "30".to_string()];
        let pid = spawn(&SpawnRequest { argv: &argv, cwd: dir.path(), env: Vec::new(), log: &log }).unwrap();
        // SAFETY: signalling the process group of our own child.
        unsafe { libc::kill(-pid, libc::SIGTERM) };
        assert_eq!(wait(pid).unwrap().signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn the_command_dies_with_the_thread_that_started_it() {
        // PR_SET_PDEATHSIG fires when the spawning thread ends: here, a thread that leaves its child running.
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let cwd = dir.path().to_path_buf();
        let pid = std::thread::spawn(move || {
            let argv = vec!["sleep".to_string(), "30".to_string()];
            spawn(&SpawnRequest { argv: &argv, cwd: &cwd, env: Vec::new(), log: &log }).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(wait(pid).unwrap().signal(), Some(libc::SIGKILL));
    }
}
