//! Two "nodes" on one host for the live-migration tests: two network
//! namespaces joined by a veth pair ([`Nodes`]), and a `ferry agent`
//! running in one of them ([`Agent`]).
//!
//! The nodes share everything but the network: one pid namespace (so the
//! test sees every process of both in /proc, and the agent must restore
//! jobs into pid namespaces of their own to keep their pids), one
//! filesystem (so a job's log file is the same file on both sides).
//!
//! Layout of one [`Nodes`]:
//!
//! ```text
//!   netns ferry-t<pid>-<n>a              netns ferry-t<pid>-<n>b
//!   lo 127.0.0.1 (up)                    lo 127.0.0.1 (up)
//!   veth-a 10.250.K.1/30  <---------->   veth-b 10.250.K.2/30
//! ```
//!
//! The veth ends are created directly inside their namespaces and the
//! addresses exist only there; dropping the `Nodes` kills whatever still
//! runs in either namespace, reaps what it can and deletes both (which
//! destroys the veth pair). Namespaces left behind by a test process that
//! was killed (its pid no longer exists) are removed by the next
//! [`Nodes::new`]; `scripts/netns clean` does the same by hand.
//!
//! Processes enter a node with [`Nodes::exec`] (`ip netns exec`); the test
//! itself opens sockets there with [`Nodes::in_ns`], which runs a closure
//! on a thread moved into the namespace with setns(2): a socket keeps the
//! namespace it was created in.

use super::procs::{self, Bg};
use super::FERRY;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

/// Port the tests' agents listen on (ferry's default port; every [`Nodes`]
/// has its own network namespaces, so they never collide).
pub const AGENT_PORT: u16 = 7707;

/// How long [`Agent::start`] waits for the `listening on` line.
pub const AGENT_START_TIMEOUT: Duration = Duration::from_secs(20);

const NETNS_DIR: &str = "/run/netns";
const NAME_PREFIX: &str = "ferry-t";

/// One of the two nodes: A is the source of the migrations, B the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ns {
    A,
    B,
}

impl Ns {
    fn index(self) -> usize {
        match self {
            Ns::A => 0,
            Ns::B => 1,
        }
    }

    pub fn other(self) -> Ns {
        match self {
            Ns::A => Ns::B,
            Ns::B => Ns::A,
        }
    }
}

/// Runs `ip ARGS`, panicking with its stderr if it fails.
fn ip(args: &[&str]) {
    run_tool("ip", args);
}

fn run_tool(tool: &str, args: &[&str]) {
    let out = tool_output(tool, args);
    assert!(
        out.status.success(),
        "`{tool} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
}

fn tool_output(tool: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(tool);
    cmd.args(args).stdin(Stdio::null());
    super::cloexec_inherited_fds(&mut cmd);
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"))
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// (device, inode) of the network namespace bound at /run/netns/NAME.
fn netns_id_of(name: &str) -> Option<(u64, u64)> {
    let m = fs::metadata(netns_path(name)).ok()?;
    Some((m.dev(), m.ino()))
}

/// Live processes (not zombies) whose network namespace is `name`.
fn pids_in_netns(name: &str) -> Vec<i32> {
    let Some(id) = netns_id_of(name) else {
        return Vec::new();
    };
    let me = procs::my_pid();
    procs::all_procs()
        .into_iter()
        .filter(|&(pid, _, state)| pid != me && state != 'Z')
        .filter(|&(pid, _, _)| procs::ns_id(pid, "net") == Some(id))
        .map(|(pid, _, _)| pid)
        .collect()
}

/// Kills everything in namespace `name`, reaps what is ours, deletes it.
/// Never panics (used from Drop); problems are printed.
fn teardown(name: &str) {
    let mut pids = pids_in_netns(name);
    for round in 0..3 {
        if pids.is_empty() {
            break;
        }
        eprintln!("netns {name}: killing leftover processes {pids:?}");
        for &pid in &pids {
            procs::signal(pid, libc::SIGKILL);
        }
        if let Err(e) = procs::wait_vanished(&pids, Duration::from_secs(5)) {
            eprintln!("netns {name}: {e}");
        }
        // Killing one may have let another one fork meanwhile.
        pids = pids_in_netns(name);
        if round == 2 && !pids.is_empty() {
            eprintln!("netns {name}: processes still there: {pids:?}");
        }
    }
    if netns_path(name).exists() {
        let out = tool_output("ip", &["netns", "del", name]);
        if !out.status.success() {
            eprintln!(
                "ip netns del {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
    }
}

/// Removes test namespaces whose creator (the pid in their name) is gone.
pub fn clean_stale_namespaces() {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid != procs::my_pid() && procs::stat_of(pid).is_none() {
            eprintln!("removing stale test namespace {name}");
            teardown(&name);
        }
    }
}

/// Two network namespaces joined by a veth pair (see the module doc).
pub struct Nodes {
    names: [String; 2],
    /// The third octet of the /30: 10.250.`net`.0/30.
    net: u8,
    /// Namespaces created so far (all of them once `new` returns).
    created: Vec<String>,
}

/// Interface names of the veth ends, in A and in B.
pub const VETH: [&str; 2] = ["veth-a", "veth-b"];

impl Nodes {
    /// Creates both namespaces, the veth pair with 10.250.K.1/30 (A) and
    /// 10.250.K.2/30 (B), and brings every link up. Panics on failure
    /// (whatever was created is removed again).
    pub fn new() -> Nodes {
        static N: AtomicU32 = AtomicU32::new(0);
        clean_stale_namespaces();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = procs::my_pid() as u32;
        let base = format!("{NAME_PREFIX}{pid}-{n}");
        // Any /30 would do (the addresses exist only inside the pair); a
        // different one per pair makes captures and messages unambiguous.
        let net = (pid.wrapping_mul(31).wrapping_add(n) % 254 + 1) as u8;
        let mut nodes = Nodes {
            names: [format!("{base}a"), format!("{base}b")],
            net,
            created: Vec::new(),
        };
        for i in 0..2 {
            let name = nodes.names[i].clone();
            if netns_path(&name).exists() {
                // Left over by an earlier test process that had our pid.
                teardown(&name);
            }
            ip(&["netns", "add", &name]);
            nodes.created.push(name);
        }
        let (a, b) = (nodes.names[0].clone(), nodes.names[1].clone());
        ip(&[
            "link", "add", VETH[0], "netns", &a, "type", "veth", "peer", "name", VETH[1], "netns",
            &b,
        ]);
        for ns in [Ns::A, Ns::B] {
            let name = nodes.name(ns).to_string();
            let cidr = format!("{}/30", nodes.addr(ns));
            let veth = VETH[ns.index()];
            ip(&["-n", &name, "addr", "add", &cidr, "dev", veth]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
            ip(&["-n", &name, "link", "set", veth, "up"]);
        }
        eprintln!(
            "nodes: {} ({}) <-> {} ({})",
            nodes.names[0],
            nodes.addr_a(),
            nodes.names[1],
            nodes.addr_b()
        );
        nodes
    }

    /// The namespace's name (for `ip netns exec NAME`, `ip -n NAME`).
    pub fn name(&self, ns: Ns) -> &str {
        &self.names[ns.index()]
    }

    /// The veth interface of node `ns` (inside its namespace).
    pub fn veth(&self, ns: Ns) -> &'static str {
        VETH[ns.index()]
    }

    pub fn addr(&self, ns: Ns) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.net, ns.index() as u8 + 1)
    }

    pub fn addr_a(&self) -> Ipv4Addr {
        self.addr(Ns::A)
    }

    pub fn addr_b(&self) -> Ipv4Addr {
        self.addr(Ns::B)
    }

    /// (device, inode) of the namespace, comparable with
    /// [`procs::ns_id`]`(pid, "net")`.
    pub fn netns_id(&self, ns: Ns) -> (u64, u64) {
        netns_id_of(self.name(ns))
            .unwrap_or_else(|| panic!("network namespace {} is gone", self.name(ns)))
    }

    /// Whether process `pid` is on node `ns`.
    pub fn contains(&self, ns: Ns, pid: i32) -> bool {
        procs::ns_id(pid, "net") == Some(self.netns_id(ns))
    }

    /// Live processes on node `ns`.
    pub fn pids(&self, ns: Ns) -> Vec<i32> {
        pids_in_netns(self.name(ns))
    }

    /// A command that runs `program` on node `ns` (`ip netns exec NAME
    /// program`; ip execs it, so the child's pid is the program's). Add
    /// arguments, environment and stdio as usual.
    pub fn exec(&self, ns: Ns, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name(ns)]).arg(program);
        super::cloexec_inherited_fds(&mut cmd);
        cmd
    }

    /// Runs `f` on a thread that has joined node `ns`'s network namespace:
    /// sockets it creates belong to that node (and keep it afterwards).
    pub fn in_ns<T: Send>(&self, ns: Ns, f: impl FnOnce() -> T + Send) -> T {
        let path = netns_path(self.name(ns));
        thread::scope(|s| {
            s.spawn(|| {
                let file =
                    File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                // SAFETY: setns on an fd we own; only this thread moves.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    r,
                    0,
                    "setns({}): {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// A TCP connection from node `from` to `to`.
    pub fn connect(
        &self,
        from: Ns,
        to: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        self.in_ns(from, || TcpStream::connect_timeout(&to, timeout))
    }

    /// (rx_bytes, tx_bytes) of interface `iface` on node `ns`, from
    /// /proc/thread-self/net/dev of a thread in that namespace.
    pub fn iface_bytes(&self, ns: Ns, iface: &str) -> (u64, u64) {
        let text = self
            .in_ns(ns, || fs::read_to_string("/proc/thread-self/net/dev"))
            .unwrap_or_else(|e| panic!("read net/dev of {}: {e}", self.name(ns)));
        for line in text.lines() {
            if let Some((name, rest)) = line.split_once(':') {
                if name.trim() == iface {
                    let f: Vec<u64> = rest
                        .split_whitespace()
                        .filter_map(|s| s.parse().ok())
                        .collect();
                    if f.len() >= 9 {
                        return (f[0], f[8]);
                    }
                }
            }
        }
        panic!("no interface {iface} on {}:\n{text}", self.name(ns));
    }

    /// Bytes sent so far by node `ns` over the veth.
    pub fn tx_bytes(&self, ns: Ns) -> u64 {
        self.iface_bytes(ns, self.veth(ns)).1
    }

    /// Limits both directions of the link to `rate` (tc syntax, e.g.
    /// "1gbit"): a tbf qdisc on each veth end, or netem's rate where tbf is
    /// missing. Replaces any earlier shaping.
    pub fn shape(&self, rate: &str) {
        for ns in [Ns::A, Ns::B] {
            let name = self.name(ns);
            let veth = self.veth(ns);
            // A burst of 1 MB covers a 1 Gbit/s rate at any timer frequency.
            let tbf = tool_output(
                "ip",
                &[
                    "netns", "exec", name, "tc", "qdisc", "replace", "dev", veth, "root", "tbf",
                    "rate", rate, "burst", "1mb", "latency", "20ms",
                ],
            );
            if tbf.status.success() {
                continue;
            }
            let netem = tool_output(
                "ip",
                &[
                    "netns", "exec", name, "tc", "qdisc", "replace", "dev", veth, "root", "netem",
                    "rate", rate,
                ],
            );
            assert!(
                netem.status.success(),
                "cannot shape {veth} in {name} to {rate}: tbf: {}; netem: {}",
                String::from_utf8_lossy(&tbf.stderr).trim_end(),
                String::from_utf8_lossy(&netem.stderr).trim_end()
            );
        }
    }

    /// Removes the shaping of [`shape`](Self::shape).
    pub fn unshape(&self) {
        for ns in [Ns::A, Ns::B] {
            let out = tool_output(
                "ip",
                &[
                    "netns",
                    "exec",
                    self.name(ns),
                    "tc",
                    "qdisc",
                    "del",
                    "dev",
                    self.veth(ns),
                    "root",
                ],
            );
            if !out.status.success() {
                eprintln!(
                    "unshape {}: {}",
                    self.name(ns),
                    String::from_utf8_lossy(&out.stderr).trim_end()
                );
            }
        }
    }

    /// The qdiscs of node `ns`'s veth (`tc qdisc show`), for checks.
    pub fn qdiscs(&self, ns: Ns) -> String {
        let out = tool_output(
            "ip",
            &[
                "netns",
                "exec",
                self.name(ns),
                "tc",
                "qdisc",
                "show",
                "dev",
                self.veth(ns),
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sets node `ns`'s end of the veth down or up.
    pub fn set_link(&self, ns: Ns, up: bool) {
        ip(&[
            "-n",
            self.name(ns),
            "link",
            "set",
            self.veth(ns),
            if up { "up" } else { "down" },
        ]);
    }

    /// Cuts the link: B's end goes down, so A's end loses its carrier and
    /// everything A sends is dropped without an error, as when a cable
    /// breaks somewhere between the nodes. Only timeouts notice it.
    pub fn link_down(&self) {
        self.set_link(Ns::B, false);
    }

    /// Undoes [`link_down`](Self::link_down) (both ends up).
    pub fn link_up(&self) {
        self.set_link(Ns::B, true);
        self.set_link(Ns::A, true);
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for name in self.created.drain(..).rev() {
            teardown(&name);
        }
    }
}

// ---------------------------------------------------------------------------
// The agent

/// How a `ferry agent` that should have started ended instead.
#[derive(Debug)]
pub struct AgentExit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A `ferry agent` running on one node; killed and reaped on drop. Its
/// stdout and stderr are collected for diagnostics (and printed when the
/// test panics).
pub struct Agent {
    bg: Bg,
    addr: SocketAddr,
    ns_name: String,
}

impl Agent {
    /// Starts `ferry agent --listen ADDR:port [--token-file token]` on node
    /// `ns` (ADDR: that node's veth address) and waits for it to listen.
    /// Panics if it does not.
    pub fn start(nodes: &Nodes, ns: Ns, port: u16, token: Option<&Path>) -> Agent {
        let listen = SocketAddr::V4(SocketAddrV4::new(nodes.addr(ns), port));
        Self::try_start(nodes, ns, &listen.to_string(), token).unwrap_or_else(|e| {
            panic!(
                "ferry agent --listen {listen} on {} did not start: {}\nstderr:\n{}",
                nodes.name(ns),
                super::describe(e.status),
                e.stderr
            )
        })
    }

    /// Starts `ferry agent --listen LISTEN [--token-file token]` on node
    /// `ns` and waits (bounded by [`AGENT_START_TIMEOUT`]) for a stderr line
    /// containing `listening on`. `Err` if it exits first; panics if it
    /// neither listens nor exits in time.
    pub fn try_start(
        nodes: &Nodes,
        ns: Ns,
        listen: &str,
        token: Option<&Path>,
    ) -> Result<Agent, AgentExit> {
        let mut cmd = nodes.exec(ns, FERRY);
        cmd.args(["agent", "--listen", listen]);
        if let Some(t) = token {
            cmd.arg("--token-file").arg(t);
        }
        let mut bg = Bg::spawn(&mut cmd, &format!("ferry agent --listen {listen}"));
        let end = Instant::now() + AGENT_START_TIMEOUT;
        loop {
            if bg.stderr_text().contains("listening on") {
                break;
            }
            if let Some(status) = bg.try_status() {
                // Let the readers catch the last lines.
                sleep(Duration::from_millis(50));
                return Err(AgentExit {
                    status,
                    stdout: bg.stdout_text(),
                    stderr: bg.stderr_text(),
                });
            }
            if Instant::now() > end {
                let err = bg.stderr_text();
                bg.kill();
                panic!(
                    "ferry agent --listen {listen} printed no `listening on` line within \
                     {AGENT_START_TIMEOUT:?}; stderr:\n{err}"
                );
            }
            sleep(Duration::from_millis(10));
        }
        let addr = listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], AGENT_PORT)));
        eprintln!(
            "agent pid {} listening on {listen} in {}",
            bg.pid(),
            nodes.name(ns)
        );
        Ok(Agent {
            bg,
            addr,
            ns_name: nodes.name(ns).to_string(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.bg.pid()
    }

    /// Where it listens, for `ferry migrate --to`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Still running.
    pub fn alive(&mut self) -> bool {
        self.bg.running()
    }

    /// Everything it printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.bg.stderr_text()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        self.bg.kill();
    }

    /// Sends `sig` and waits up to `timeout` for the exit.
    pub fn stop_with(&mut self, sig: i32, timeout: Duration) -> Option<ExitStatus> {
        self.bg.signal(sig);
        self.bg.wait_timeout(timeout)
    }

    /// Panics (with its stderr) unless it runs and never panicked.
    pub fn assert_healthy(&mut self, when: &str) {
        let err = self.stderr();
        assert!(
            !err.contains("panicked"),
            "ferry agent panicked ({when}):\n{err}"
        );
        if let Some(st) = self.bg.try_status() {
            panic!(
                "ferry agent (pid {}) is gone {when}: {}\nstderr:\n{err}",
                self.pid(),
                super::describe(st)
            );
        }
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.bg.kill();
        if thread::panicking() {
            eprintln!(
                "--- stderr of ferry agent in {} ---\n{}--- end ---",
                self.ns_name,
                self.bg.stderr_text()
            );
        }
    }
}
