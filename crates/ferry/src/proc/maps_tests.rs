//! Tests for maps.rs, kept apart because of the long captured samples.

use super::*;

/// /proc/PID/maps of a probe on Linux 6.18 that mapped shared anon memory,
/// SysV shm, a memfd, an unlinked file and a file with spaces in its name.
/// Anonymous lines end in "0 " (trailing space) exactly as the kernel prints.
const REAL_MAPS: &str = r#"557caff8d000-557caff8e000 r--p 00000000 fe:00 10010699                   /tmp/probe/m
557caff8e000-557caff8f000 r-xp 00001000 fe:00 10010699                   /tmp/probe/m
557caff8f000-557caff90000 r--p 00002000 fe:00 10010699                   /tmp/probe/m
557caff90000-557caff91000 r--p 00002000 fe:00 10010699                   /tmp/probe/m
557caff91000-557caff92000 rw-p 00003000 fe:00 10010699                   /tmp/probe/m
7f420ca00000-7f420ca01000 rw-p 00000000 00:00 0 
7f420ca01000-7f420ce00000 rw-p 00000000 00:00 0 
7f420cf6a000-7f420cf6b000 rw-s 00000000 00:01 1032                       /dev/zero (deleted)
7f420cf6b000-7f420cf6e000 rw-p 00000000 00:00 0 
7f420cf6e000-7f420cf94000 r--p 00000000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f420cf94000-7f420d0ea000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f420d0ea000-7f420d13d000 r--p 0017c000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f420d13d000-7f420d141000 r--p 001cf000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f420d141000-7f420d143000 rw-p 001d3000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f420d143000-7f420d150000 rw-p 00000000 00:00 0 
7f420d150000-7f420d151000 rw-s 00000000 00:01 1                          /SYSV00000000 (deleted)
7f420d151000-7f420d152000 rw-p 00000000 00:00 0 
7f420d152000-7f420d153000 rw-p 00000000 00:00 0 
7f420d153000-7f420d154000 rw-p 00000000 00:00 0 
7f420d154000-7f420d155000 rw-s 00000000 fe:00 10010694                   /tmp/probe/gone (deleted)
7f420d155000-7f420d156000 r--p 00000000 fe:00 10010821                   /tmp/probe/with space (x).txt
7f420d156000-7f420d157000 r--s 00000000 00:01 1030                       /memfd:my memfd (deleted)
7f420d157000-7f420d159000 rw-s 00000000 00:01 1029                       /dev/zero (deleted)
7f420d159000-7f420d15b000 rw-p 00000000 00:00 0 
7f420d15b000-7f420d15f000 r--p 00000000 00:00 0                          [vvar]
7f420d15f000-7f420d161000 r--p 00000000 00:00 0                          [vvar_vclock]
7f420d161000-7f420d163000 r-xp 00000000 00:00 0                          [vdso]
7f420d163000-7f420d164000 r--p 00000000 fe:00 325843                     /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7f420d164000-7f420d18a000 r-xp 00001000 fe:00 325843                     /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7f420d18a000-7f420d194000 r--p 00027000 fe:00 325843                     /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7f420d194000-7f420d196000 r--p 00031000 fe:00 325843                     /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7f420d196000-7f420d198000 rw-p 00033000 fe:00 325843                     /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7ffef7d80000-7ffef7da1000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"#;

/// Three complete VMAs from /proc/PID/smaps on the same machine.
const REAL_SMAPS: &str = r#"7fdf38fd9000-7fdf38fdb000 rw-s 00000000 00:01 1025                       /dev/zero (deleted)
Size:                  8 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                   4 kB
Pss:                   4 kB
Pss_Dirty:             4 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:         4 kB
Referenced:            4 kB
Anonymous:             0 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           0
VmFlags: rd wr sh mr mw me ms 
7ffe945da000-7ffe945fb000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                  16 kB
Pss:                  16 kB
Pss_Dirty:            16 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:        16 kB
Referenced:           16 kB
Anonymous:            16 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           0
VmFlags: rd wr mr mw me gd ac 
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
Size:                  4 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                   0 kB
Pss:                   0 kB
Pss_Dirty:             0 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:         0 kB
Referenced:            0 kB
Anonymous:             0 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           0
VmFlags: ex 
"#;

fn one(line: &str) -> MapEntry {
    let v = parse_maps(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(v.len(), 1);
    v.into_iter().next().unwrap_or_else(|| unreachable!())
}

fn find<'a>(v: &'a [MapEntry], path: &str) -> &'a MapEntry {
    v.iter()
        .find(|m| m.path.as_deref() == Some(path))
        .unwrap_or_else(|| panic!("no {path}"))
}

#[test]
fn real_maps_sample() {
    let v = parse_maps(REAL_MAPS).unwrap();
    assert_eq!(v.len(), REAL_MAPS.lines().count());
    assert!(v.windows(2).all(|w| w[0].end <= w[1].start));

    let exe = &v[0];
    assert_eq!(exe.path.as_deref(), Some("/tmp/probe/m"));
    assert_eq!((exe.dev_major, exe.dev_minor), (0xfe, 0));
    assert!(exe.perms.read && !exe.perms.write && !exe.perms.shared);
    assert!(!exe.is_anon() && !exe.is_shmem() && exe.special().is_none());

    let anon = v.iter().find(|m| m.path.is_none()).unwrap();
    assert!(anon.is_anon() && !anon.deleted && anon.inode == 0);

    let spaced = find(&v, "/tmp/probe/with space (x).txt");
    assert!(!spaced.deleted && spaced.inode == 10010821);

    let gone = find(&v, "/tmp/probe/gone");
    assert!(gone.deleted && gone.perms.shared && !gone.is_shmem());

    let memfd = find(&v, "/memfd:my memfd");
    assert!(memfd.deleted && memfd.is_shmem() && !memfd.is_anon());
    assert_eq!(
        memfd.shmem_kind(),
        Some(ShmemKind::Memfd {
            name: "my memfd".into()
        })
    );

    // The inode of a SysV mapping is the shm id (1 here).
    let sysv = find(&v, "/SYSV00000000");
    assert_eq!(sysv.inode, 1);
    assert_eq!(sysv.shmem_kind(), Some(ShmemKind::SysV { key: 0 }));
    assert!(!sysv.is_anon());

    let zero: Vec<_> = v
        .iter()
        .filter(|m| m.path.as_deref() == Some("/dev/zero"))
        .collect();
    assert_eq!(zero.len(), 2);
    assert!(zero
        .iter()
        .all(|m| m.is_shmem() && m.deleted && m.perms.shared));

    let vvar = find(&v, "[vvar]");
    assert_eq!((vvar.special(), vvar.pages()), (Some(Special::Vvar), 4));
    let vclock = find(&v, "[vvar_vclock]");
    assert_eq!(
        (vclock.special(), vclock.pages()),
        (Some(Special::VvarVclock), 2)
    );
    let vdso = find(&v, "[vdso]");
    assert_eq!((vdso.special(), vdso.pages()), (Some(Special::Vdso), 2));
    assert!(vdso.perms.exec && vdso.perms.prot() == libc::PROT_READ | libc::PROT_EXEC);

    let stack = find(&v, "[stack]");
    assert!(stack.is_anon() && stack.special() == Some(Special::Stack));

    let vsyscall = v.last().unwrap();
    assert_eq!(vsyscall.start, 0xffffffffff600000);
    assert_eq!(vsyscall.special(), Some(Special::Vsyscall));
    assert_eq!(vsyscall.perms.prot(), libc::PROT_EXEC);
    assert_eq!(vsyscall.perms.to_string(), "--xp");
}

#[test]
fn real_smaps_sample() {
    let v = parse_smaps(REAL_SMAPS).unwrap();
    assert_eq!(v.len(), 3);
    let f = |i: usize| v[i].vm_flags.clone().unwrap();
    assert!(v[0].is_shmem() && f(0).shared() && f(0).may_share());
    assert!(v[1].special() == Some(Special::Stack) && f(1).growsdown());
    assert_eq!(f(2).to_string(), "ex");
    // The header part matches what maps gives.
    let headers: String = REAL_SMAPS
        .lines()
        .filter(|l| !l.split_whitespace().next().unwrap_or(":").ends_with(':'))
        .map(|l| format!("{l}\n"))
        .collect();
    let from_maps = parse_maps(&headers).unwrap();
    for (a, b) in v.iter().zip(&from_maps) {
        assert_eq!(
            MapEntry {
                vm_flags: None,
                ..a.clone()
            },
            *b
        );
    }
}

#[test]
fn header_fields() {
    let m = one("7f31f646f000-7f31f6470000 r--p 0001c000 103:0a 316538                     /usr/lib/locale/C.utf8/LC_MESSAGES/SYS_LC_MESSAGES");
    assert_eq!(
        (m.start, m.end, m.offset),
        (0x7f31f646f000, 0x7f31f6470000, 0x1c000)
    );
    assert_eq!((m.dev_major, m.dev_minor, m.inode), (0x103, 0x0a, 316538));
    assert_eq!((m.len(), m.pages()), (4096, 1));
    assert!(m.contains(0x7f31f646f000) && !m.contains(0x7f31f6470000));
    assert_eq!(m.vm_flags, None);
}

#[test]
fn edge_case_names() {
    // Single space before the name, as in a header longer than the padding.
    let m = one("1000-2000 rw-s 00000000 00:01 5 /a b  c (deleted)");
    assert_eq!((m.path.as_deref(), m.deleted), (Some("/a b  c"), true));

    let m = one("1000-2000 rw-p 00000000 00:00 0      [anon:my buffer]");
    assert!(m.is_anon() && m.special().is_none() && !m.is_shmem());
    assert_eq!(m.anon_name(), Some("my buffer"));

    let m = one("1000-2000 rw-s 00000000 00:01 7      [anon_shmem:ring]");
    assert!(!m.is_anon() && m.special().is_none());
    assert_eq!(
        m.shmem_kind(),
        Some(ShmemKind::AnonShmem {
            name: "ring".into()
        })
    );

    let m = one("1000-2000 r-xp 00000000 00:00 0      [uprobes]");
    assert_eq!(m.special(), Some(Special::Other("[uprobes]".into())));
    assert!(!m.is_anon());

    assert_eq!(
        one("1000-2000 rw-p 00000000 00:00 0      [heap]").special(),
        Some(Special::Heap)
    );
    assert!(one("1000-2000 rw-p 00000000 00:00 0      [heap]").is_anon());

    // A disk file that merely looks like shmem or a special name.
    assert!(!one("1000-2000 rw-s 00000000 08:01 9 /dev/zero").is_shmem());
    assert!(one("1000-2000 rw-p 00000000 08:01 9 [heap]")
        .special()
        .is_none());

    // Segment id 0 is printed with inode 0 (captured on this kernel).
    let m = one("7fdf38fd2000-7fdf38fd3000 rw-s 00000000 00:01 0                          /SYSV00000000 (deleted)");
    assert_eq!(m.shmem_kind(), Some(ShmemKind::SysV { key: 0 }));
    assert!(!m.is_anon() && m.special().is_none());
    let m = one("1000-2000 rw-s 00000000 00:01 3 /SYSV0000abcd (deleted)");
    assert_eq!(m.shmem_kind(), Some(ShmemKind::SysV { key: 0xabcd }));

    // Only the last " (deleted)" is a marker.
    let m = one("1000-2000 r--p 00000000 08:01 9 /x (deleted) (deleted)");
    assert_eq!((m.path.as_deref(), m.deleted), (Some("/x (deleted)"), true));

    // No name: trailing spaces only.
    assert_eq!(one("1000-2000 ---p 00000000 00:00 0    ").path, None);
    assert_eq!(
        one("1000-2000 ---p 00000000 00:00 0").perms.prot(),
        libc::PROT_NONE
    );
}

fn parse_err(text: &str) -> (usize, String) {
    match parse_maps_at(Path::new("/proc/1/maps"), text) {
        Err(ProcError::Parse { path, line, what }) => {
            assert_eq!(path, Path::new("/proc/1/maps"));
            (line, what)
        }
        other => panic!("{text:?} gave {other:?}"),
    }
}

#[test]
fn malformed_lines_are_errors() {
    let good = "1000-2000 r--p 00000000 08:01 9 /x\n";
    for bad in [
        "1000 r--p 00000000 08:01 9",
        "1000-zz r--p 00000000 08:01 9",
        "+1000-2000 r--p 00000000 08:01 9",
        "2000-1000 r--p 00000000 08:01 9",
        "1000-2000 r--q 00000000 08:01 9",
        "1000-2000 r-- 00000000 08:01 9",
        "1000-2000 rwxpp 00000000 08:01 9",
        "1000-2000 r--p 0000g000 08:01 9",
        "1000-2000 r--p 00000000 0801 9",
        "1000-2000 r--p 00000000 08:01 -9",
        "1000-2000 r--p 00000000 08:01",
        "1000-2000 r--p 00000000 123456789:01 9",
        "10000000000000000-2 r--p 00000000 08:01 9",
        "1000-2000",
    ] {
        let (line, what) = parse_err(&format!("{good}{bad}\n{good}"));
        assert_eq!(line, 2, "{bad:?}: {what}");
    }
}

#[test]
fn smaps_field_before_header_is_error() {
    let err = parse_smaps("VmFlags: rd\n").unwrap_err();
    assert!(matches!(err, ProcError::Parse { line: 1, .. }), "{err}");
}

#[test]
fn serde_round_trip() {
    let v = parse_smaps(REAL_SMAPS).unwrap();
    let bytes = postcard::to_stdvec(&v).unwrap();
    let back: Vec<MapEntry> = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(v, back);
}

#[test]
fn live_self_maps() {
    let pid = std::process::id() as i32;
    let local = 0u64;
    let local_addr = &local as *const u64 as u64;
    let code_addr = live_self_maps as fn() as usize as u64;

    let v = read_maps(pid).unwrap();
    let stack_vma = v.iter().find(|m| m.contains(local_addr)).unwrap();
    assert!(stack_vma.perms.read && stack_vma.perms.write);
    assert!(v.iter().any(|m| m.special() == Some(Special::Stack)));
    assert!(v.iter().any(|m| m.special() == Some(Special::Vdso)));

    let code = v.iter().find(|m| m.contains(code_addr)).unwrap();
    assert!(code.perms.exec && code.inode != 0);
    let exe = std::env::current_exe().unwrap();
    assert_eq!(code.path.as_deref(), exe.to_str());
}

#[test]
fn live_self_smaps() {
    let v = read_smaps(std::process::id() as i32).unwrap();
    assert!(v.iter().all(|m| m.vm_flags.is_some()));
    let stack = v
        .iter()
        .find(|m| m.special() == Some(Special::Stack))
        .unwrap();
    assert!(stack.vm_flags.as_ref().unwrap().growsdown());
    let vvar = v.iter().find(|m| m.special() == Some(Special::Vvar));
    if let Some(vvar) = vvar {
        assert!(vvar.vm_flags.as_ref().unwrap().pfnmap());
    }
}

#[test]
fn missing_process_is_gone() {
    assert!(matches!(
        read_maps(i32::MAX),
        Err(ProcError::Gone { pid: i32::MAX })
    ));
    assert!(matches!(read_smaps(-3), Err(ProcError::Gone { pid: -3 })));
}
