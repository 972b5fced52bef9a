//! Property tests: the parsers must return errors, never panic, whatever
//! the input. Each gets both arbitrary text and text shaped like its file,
//! since purely random strings rarely get past the first field.

use super::*;
use proptest::prelude::*;

/// Text that looks like maps/smaps lines, with random damage.
fn maps_like() -> impl Strategy<Value = String> {
    let line = "[0-9a-f]{0,17}-[0-9a-fx]{0,17} [rwxsp-]{3,5} [0-9a-f]{0,9} [0-9a-f]{0,3}:[0-9a-f]{0,3} [0-9]{0,21}( +[ -~]{0,20})?";
    let field = "(VmFlags|Rss|Size): *[a-z0-9 ]{0,20}";
    prop::collection::vec(prop_oneof![line, field], 0..8).prop_map(|v| v.join("\n"))
}

/// Text that looks like a stat line, with random damage.
fn stat_like() -> impl Strategy<Value = String> {
    (
        "-?[0-9]{0,11}",
        "[ -~]{0,20}",
        prop::collection::vec("-?[0-9]{0,21}|[A-Z]", 0..60),
    )
        .prop_map(|(pid, comm, rest)| format!("{pid} ({comm}) {}\n", rest.join(" ")))
}

/// `Key:\tvalue` lines using the keys status and fdinfo know.
fn keyed_like() -> impl Strategy<Value = String> {
    let key = "(Name|Umask|State|Tgid|Pid|PPid|TracerPid|Uid|Gid|Groups|NSpid|Threads|SigBlk|CapEff|NoNewPrivs|Seccomp|pos|flags|mnt_id|ino|tfd)";
    let line = (key, "[ -~\t]{0,24}").prop_map(|(k, v)| format!("{k}:\t{v}"));
    prop::collection::vec(line, 0..16).prop_map(|v| v.join("\n"))
}

proptest! {
    #[test]
    fn maps_never_panics(s in ".*", t in maps_like()) {
        let _ = parse_maps(&s);
        let _ = parse_smaps(&s);
        if let Ok(v) = parse_smaps(&t) {
            for m in &v {
                let _ = (m.len(), m.pages(), m.special(), m.is_anon(), m.shmem_kind());
            }
        }
        let _ = parse_maps(&t);
    }

    #[test]
    fn stat_never_panics(s in ".*", t in stat_like()) {
        let _ = parse_stat(&s);
        let _ = parse_stat(&t);
    }

    #[test]
    fn status_never_panics(s in ".*", t in keyed_like()) {
        let _ = parse_status(&s);
        let _ = parse_status(&t);
    }

    #[test]
    fn fdinfo_never_panics(s in ".*", t in keyed_like()) {
        let _ = parse_fdinfo(&s);
        let _ = parse_fdinfo(&t);
    }

    #[test]
    fn vmflags_never_panics(s in ".*") {
        let f = VmFlags::from_smaps_line(&s);
        let _ = (f.to_string(), f.is_empty(), f.codes().count());
    }
}
