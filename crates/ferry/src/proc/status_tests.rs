//! Tests for status.rs, kept apart because of the captured sample.

use super::*;

/// /proc/self/status of `cat` on Linux 6.18, as root.
const REAL: &str = r#"Name:	cat
Umask:	0022
State:	R (running)
Tgid:	3897
Ngid:	0
Pid:	3897
PPid:	3858
TracerPid:	0
Uid:	0	0	0	0
Gid:	0	0	0	0
FDSize:	256
Groups:	 
NStgid:	3897
NSpid:	3897
NSpgid:	3858
NSsid:	1914
Kthread:	0
VmPeak:	    3060 kB
VmSize:	    3060 kB
VmLck:	       0 kB
VmPin:	       0 kB
VmHWM:	    1572 kB
VmRSS:	    1572 kB
RssAnon:	     112 kB
RssFile:	    1460 kB
RssShmem:	       0 kB
VmData:	     360 kB
VmStk:	     132 kB
VmExe:	      20 kB
VmLib:	    1528 kB
VmPTE:	      48 kB
VmSwap:	       0 kB
HugetlbPages:	       0 kB
CoreDumping:	0
THP_enabled:	1
untag_mask:	0xffffffffffffffff
Threads:	1
SigQ:	0/96365
SigPnd:	0000000000000000
ShdPnd:	0000000000000000
SigBlk:	0000000000000000
SigIgn:	0000000000000000
SigCgt:	0000000000000000
CapInh:	0000000000000000
CapPrm:	000001fffeffffff
CapEff:	000001fffeffffff
CapBnd:	000001fffeffffff
CapAmb:	0000000000000000
NoNewPrivs:	0
Seccomp:	0
Seccomp_filters:	0
Speculation_Store_Bypass:	vulnerable
SpeculationIndirectBranch:	always enabled
Cpus_allowed:	3
Cpus_allowed_list:	0-1
Mems_allowed:	00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000000,00000001
Mems_allowed_list:	0
voluntary_ctxt_switches:	0
nonvoluntary_ctxt_switches:	0
"#;

/// A zombie has no Umask line and no memory lines.
const ZOMBIE: &str = "Name:\tpython3\nState:\tZ (zombie)\nTgid:\t3445\nNgid:\t0\nPid:\t3445\nPPid:\t3404\nTracerPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nFDSize:\t0\nGroups:\t \nNStgid:\t3445\nNSpid:\t3445\nNSpgid:\t3394\nNSsid:\t1914\nKthread:\t0\nThreads:\t1\nSigQ:\t0/96365\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\nSigBlk:\t0000000000000000\nSigIgn:\t0000000001001000\nSigCgt:\t0000000000000002\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\nSeccomp:\t0\n";

#[test]
fn real_sample() {
    let s = parse_status(REAL).unwrap();
    assert_eq!(
        (s.name.as_str(), s.umask, s.state),
        ("cat", Some(0o022), 'R')
    );
    assert_eq!((s.tgid, s.pid, s.ppid, s.tracer_pid), (3897, 3897, 3858, 0));
    assert_eq!((s.uid, s.gid), ([0; 4], [0; 4]));
    assert!(s.groups.is_empty());
    assert_eq!(
        (s.ns_tgid.as_slice(), s.ns_pid.as_slice()),
        (&[3897][..], &[3897][..])
    );
    assert_eq!(
        (s.ns_pgid.as_slice(), s.ns_sid.as_slice()),
        (&[3858][..], &[1914][..])
    );
    assert_eq!(s.threads, 1);
    assert_eq!(
        (s.sig_pnd, s.shd_pnd, s.sig_blk, s.sig_ign, s.sig_cgt),
        (0, 0, 0, 0, 0)
    );
    assert_eq!(
        (s.cap_eff, s.cap_prm, s.cap_bnd),
        (0x1fffeffffff, 0x1fffeffffff, 0x1fffeffffff)
    );
    assert_eq!((s.cap_inh, s.cap_amb), (0, 0));
    assert_eq!((s.no_new_privs, s.seccomp), (false, 0));
}

#[test]
fn zombie_has_no_umask() {
    let s = parse_status(ZOMBIE).unwrap();
    assert_eq!((s.state, s.umask), ('Z', None));
    assert_eq!((s.sig_ign, s.sig_cgt), (0x1001000, 2));
}

#[test]
fn nested_namespaces_and_ids() {
    let text = ZOMBIE
        .replace("NSpid:\t3445", "NSpid:\t3445\t1")
        .replace("NStgid:\t3445", "NStgid:\t3445\t1")
        .replace("Uid:\t0\t0\t0\t0", "Uid:\t1000\t1001\t1002\t1003")
        .replace("Groups:\t ", "Groups:\t4 24 27 ")
        .replace("NoNewPrivs:\t0", "NoNewPrivs:\t1")
        .replace("Seccomp:\t0", "Seccomp:\t2")
        .replace("TracerPid:\t0", "TracerPid:\t77");
    let s = parse_status(&text).unwrap();
    assert_eq!(
        (s.ns_pid.clone(), s.ns_tgid.clone()),
        (vec![3445, 1], vec![3445, 1])
    );
    assert_eq!(s.uid, [1000, 1001, 1002, 1003]);
    assert_eq!(s.groups, [4, 24, 27]);
    assert_eq!((s.no_new_privs, s.seccomp, s.tracer_pid), (true, 2, 77));
}

#[test]
fn escaped_name() {
    // prctl(PR_SET_NAME, "a\\b\nc\td e") as printed by this kernel.
    let text = ZOMBIE.replace("Name:\tpython3", "Name:\ta\\\\b\\nc\td e");
    assert_eq!(parse_status(&text).unwrap().name, "a\\b\nc\td e");
    let text = ZOMBIE.replace("Name:\tpython3", "Name:\t a: b ");
    assert_eq!(parse_status(&text).unwrap().name, " a: b ");
    assert_eq!(unescape_name("x\\"), "x\\");
    assert_eq!(unescape_name("\\q"), "\\q");
}

#[test]
fn missing_required_fields() {
    for key in ["Name", "State", "Tgid", "Pid", "Uid", "Gid"] {
        let text: String = ZOMBIE
            .lines()
            .filter(|l| !l.starts_with(&format!("{key}:")))
            .map(|l| format!("{l}\n"))
            .collect();
        match parse_status(&text) {
            Err(ProcError::Parse { line: 0, what, .. }) => {
                assert_eq!(what, format!("missing {key}"))
            }
            other => panic!("{key}: {other:?}"),
        }
    }
}

#[test]
fn minimal_text_uses_defaults() {
    let s = parse_status("Name:\tx\nState:\tS\nTgid:\t5\nPid:\t6\nUid:\t1 2 3 4\nGid:\t5 6 7 8\n")
        .unwrap();
    assert_eq!(
        (s.tgid, s.pid, s.ppid, s.threads, s.umask),
        (5, 6, 0, 0, None)
    );
    assert!(s.ns_pid.is_empty() && !s.no_new_privs);
}

#[test]
fn malformed_values_are_errors_with_line() {
    for (from, to) in [
        ("Tgid:\t3445", "Tgid:\tx"),
        ("Uid:\t0\t0\t0\t0", "Uid:\t0\t0\t0"),
        ("Uid:\t0\t0\t0\t0", "Uid:\t0\t0\t0\t0\t0"),
        ("SigIgn:\t0000000001001000", "SigIgn:\t+1001000"),
        ("CapEff:\t000001fffeffffff", "CapEff:\t1000000000000000000"),
        ("NoNewPrivs:\t0", "NoNewPrivs:\t2"),
        ("NSpid:\t3445", "NSpid:\t3445 x"),
        ("Threads:\t1", "Threads:\t-1"),
        ("State:\tZ (zombie)", "State:\t"),
        ("FDSize:\t0", "no colon here"),
    ] {
        let text = ZOMBIE.replace(from, to);
        let want = ZOMBIE.lines().position(|l| l == from).unwrap() + 1;
        match parse_status_at(Path::new("/proc/5/status"), &text) {
            Err(ProcError::Parse { line, .. }) => assert_eq!(line, want, "{to:?}"),
            other => panic!("{to:?} gave {other:?}"),
        }
    }
}

#[test]
fn umask_is_octal() {
    let text = ZOMBIE.replace("State:", "Umask:\t0777\nState:");
    assert_eq!(parse_status(&text).unwrap().umask, Some(0o777));
    let text = ZOMBIE.replace("State:", "Umask:\t0089\nState:");
    assert!(parse_status(&text).is_err());
}

#[test]
fn live_self() {
    let pid = std::process::id() as i32;
    let s = read_status(pid).unwrap();
    assert_eq!((s.pid, s.tgid), (pid, pid));
    assert!(s.threads >= 1 && s.umask.is_some());
    // The last NSpid entry is the pid in our own namespace, which getpid gives.
    assert_eq!(s.ns_pid.last(), Some(&pid));

    let link = std::fs::read_link("/proc/thread-self").unwrap();
    let tid: i32 = link
        .to_str()
        .and_then(|s| s.rsplit('/').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    let t = read_task_status(pid, tid).unwrap();
    assert_eq!((t.pid, t.tgid, t.state), (tid, pid, 'R'));
}

#[test]
fn missing_process_is_gone() {
    assert!(matches!(read_status(i32::MAX), Err(ProcError::Gone { .. })));
}
