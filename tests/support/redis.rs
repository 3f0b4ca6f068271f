//! A real `redis-server` (the Debian package) on a free loopback port with its own folder, and
//! `zturbo worker` processes: for the broker tests and the broker benchmark. Every process is
//! killed when its handle drops (no leaked servers).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    password: Option<String>,
    /// `(certificate, key, CA)` when it listens with TLS only.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl Redis {
    /// Starts `redis-server` with AOF on (fsync at every write), no RDB snapshots, in `dir`.
    pub fn start(dir: &Path, password: Option<&str>) -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
            password: password.map(str::to_string),
            tls: None,
        };
        r.spawn();
        r
    }

    /// [`Redis::start`] listening with TLS only, its certificate (for 127.0.0.1) signed by a
    /// throwaway CA made with `openssl`; returns it and the CA's PEM file.
    pub fn start_tls(dir: &Path, password: Option<&str>) -> (Redis, PathBuf) {
        std::fs::create_dir_all(dir).unwrap();
        let ca = dir.join("ca.crt");
        let (crt, key) = (dir.join("redis.crt"), dir.join("redis.key"));
        let ext = dir.join("ext.cnf");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let p = |s: &Path| s.to_string_lossy().into_owned();
        let steps: [Vec<String>; 3] = [
            vec![
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=zturbo test CA",
                "-keyout",
                &p(&dir.join("ca.key")),
                "-out",
                &p(&ca),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            vec![
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                &p(&key),
                "-out",
                &p(&dir.join("redis.csr")),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            vec![
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &p(&dir.join("redis.csr")),
                "-CA",
                &p(&ca),
                "-CAkey",
                &p(&dir.join("ca.key")),
                "-CAcreateserial",
                "-extfile",
                &p(&ext),
                "-out",
                &p(&crt),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
        ];
        for args in steps {
            let out = Command::new("openssl")
                .args(&args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run openssl ({e}): .ci/run installs it"));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
            password: password.map(str::to_string),
            tls: Some((crt, key, ca.clone())),
        };
        r.spawn();
        (r, ca)
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some((crt, key, ca)) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(crt)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"]),
        };
        cmd.args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start redis-server ({e}): the broker tests need the Debian package \
                 `redis-server` on PATH (.ci/run installs it)"
            )
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {} within 20 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the server answers a PING (a password-protected one answers NOAUTH: it is up); a
    /// TLS one, whether it accepts connections.
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        if self.tls.is_some() {
            return true;
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) if n > 0 => buf[0] == b'+' || buf[..n].starts_with(b"-NOAUTH"),
            _ => false,
        }
    }

    /// Sends one command (plain-text servers only); the raw reply, after AUTH's `+OK`.
    pub fn command(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = Vec::new();
        if let Some(p) = &self.password {
            req.extend(resp(&["AUTH", p]));
        }
        req.extend(resp(args));
        s.write_all(&req).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        match &self.password {
            Some(_) => out.strip_prefix("+OK\r\n").unwrap_or(&out).to_string(),
            None => out,
        }
    }

    /// The keys matching `pattern` (`KEYS`), sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let out = self.command(&["KEYS", pattern]);
        // `*N`, then N bulk strings (`$len`, value).
        let mut lines = out.lines();
        let n: usize = lines.next().unwrap()[1..].parse().unwrap();
        let mut keys: Vec<String> = lines
            .filter(|l| !l.starts_with('$'))
            .take(n)
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    /// `redis://[:PASSWORD@]127.0.0.1:PORT` (`rediss://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// SIGTERM (Redis flushes its AOF and exits), then waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts it again on the same port and folder (it reloads its AOF).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `zturbo worker --model demo` process.
pub struct Worker {
    child: Child,
    pub name: String,
    log: PathBuf,
}

impl Worker {
    /// Starts a worker named `name` on `broker`; `env` is added to a cleaned environment.
    pub fn start(
        dir: &Path,
        broker: &str,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Worker {
        let log = dir.join(format!(
            "worker-{name}-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_zturbo"));
        for (k, _) in std::env::vars() {
            if k.starts_with("ZTURBO_") {
                cmd.env_remove(k);
            }
        }
        cmd.args([
            "worker", "--model", "demo", "--device", "cpu", "--broker", broker,
        ])
        .args(["--name", name])
        .arg("--models-dir")
        .arg(dir.join("no-models-here"))
        .args(args)
        .env("ZTURBO_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("spawn zturbo worker");
        Worker {
            child,
            name: name.to_string(),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log says it registered with the broker.
    pub fn wait_registered(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains("registered with the broker") {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "worker {} exited ({status}); its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "worker {} did not register within {within:?}; its log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for it to exit; its status and log.
    pub fn wait_exit(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "worker {} still running after {within:?}; its log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no goodbye, its job stays pending in the broker.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `<outputs>/*.png`.
pub fn pngs(outputs: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(outputs)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".png"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// One command in the Redis protocol.
fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    out.into_bytes()
}
