//! Local servers for the object-store tests (SeaweedFS, fake-gcs-server, Azurite): started
//! on 127.0.0.1, waited for, stopped and restarted at will, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process listening on `port`, its output in `log`.
pub struct Server {
    port: u16,
    log: PathBuf,
    command: Box<dyn Fn() -> Command>,
    child: Option<Child>,
}

impl Server {
    /// Runs `command()` and waits until `port` answers.
    pub fn start(port: u16, log: &Path, command: impl Fn() -> Command + 'static) -> Server {
        let mut server = Server {
            port,
            log: log.to_path_buf(),
            command: Box::new(command),
            child: None,
        };
        server.spawn();
        server
    }

    /// Starts the server again (after [`Server::stop`]).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = (self.command)()
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the server for port {}: {e}", self.port));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                std::thread::sleep(Duration::from_secs(2)); // let it finish starting
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "the server did not open port {}: see {}",
            self.port,
            self.log.display()
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The program in environment variable `var` (which `tests/run.sh` sets after installing
/// it); `None`, with `why` printed and left in a SKIPPED marker that `tests/run.sh` shows,
/// when it is not set.
pub fn program(var: &str, marker: &str, why: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    let why = format!("SKIPPED {why}: set {var} (tests/run.sh installs it)");
    eprintln!("{why}");
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("SKIPPED-{marker}.txt")),
        format!("{why}\n"),
    );
    None
}
