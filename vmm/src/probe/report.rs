//! What the probe found, in words: each phase's outcome described against the guest's
//! layout, and the summary [`UserSpaceProbe`].

use super::guest::{
    has_error_code, INT80_ENTRY, PRIVILEGE_CHECK, SYSCALL_ENTRY, USER_CS, USER_INT80_INSN,
    USER_SYSCALL_INSN,
};
use super::run::{Outcome, Phase};
use super::UserSpaceProbe;

pub(super) fn vector_name(v: u8) -> String {
    let name = match v {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        21 => "#CP",
        _ => return format!("vector {v:#x}"),
    };
    name.to_string()
}

/// One phase in words, and whether its handler ran in ring 0. `insn` is the address of the
/// `syscall`/`int` instruction, `handler` the address of the handler it should enter.
pub(super) fn describe(
    what: &str,
    p: &Phase,
    insn: u64,
    handler: u64,
    handler_name: &str,
) -> (bool, String) {
    let where_ = |rip: u64| {
        if rip == handler {
            format!("at {handler_name}")
        } else if rip == insn {
            format!("at the {what} instruction")
        } else if rip == PRIVILEGE_CHECK {
            "at its mov from CR0".to_string()
        } else {
            format!("at {rip:#x}")
        }
    };
    let ok = p.entered_with_cs.is_some() && matches!(p.outcome, Outcome::Privileged { .. });
    let mut text = match p.entered_with_cs {
        Some(cs) if ok && cs & 3 == 0 => format!("reached ring 0 (CS {cs:#x})"),
        Some(cs) if ok => format!("entered {handler_name} with CS {cs:#x} but could read CR0"),
        Some(cs) => {
            // Under kvm_pvm the handler reads the host's user CS (0x33), not ours.
            let note = if cs != u32::from(USER_CS) && cs & 3 != 0 {
                format!(", not the GDT's user CS {USER_CS:#x}")
            } else {
                String::new()
            };
            format!(
                "entered {handler_name} in CPL {} (CS {cs:#x}{note})",
                cs & 3
            )
        }
        None => String::new(),
    };
    let end = match &p.outcome {
        Outcome::Privileged { .. } if p.entered_with_cs.is_some() => String::new(),
        Outcome::Privileged { cr0 } => format!("privileged code ran (CR0 {cr0:#x})"),
        Outcome::Exception {
            vector,
            error,
            rip,
            saved_cs,
            cr2,
        } => {
            let mut s = format!(
                "{} {} from CPL {}",
                vector_name(*vector),
                where_(*rip),
                saved_cs & 3
            );
            if has_error_code(*vector) {
                s.push_str(&format!(", error {error:#x}"));
            }
            if *vector == 14 {
                s.push_str(&format!(", CR2 {cr2:#x}"));
            }
            s
        }
        Outcome::FellThrough => "returned to ring 3 without entering a handler".into(),
        Outcome::Exit(e) => e.clone(),
        Outcome::Timeout => "no report within the time limit".into(),
    };
    if !end.is_empty() {
        if !text.is_empty() {
            text.push_str(", then ");
        }
        text.push_str(&end);
    }
    let text = if p.reached_user {
        format!("{what}: {text}")
    } else {
        format!("{what}: never reached user mode: {text}")
    };
    (ok, text)
}

pub(super) fn summarize(phases: &[Phase]) -> UserSpaceProbe {
    let (Some(sys), Some(i80)) = (phases.first(), phases.get(1)) else {
        return UserSpaceProbe {
            reached_user_mode: false,
            syscall_works: false,
            int80_works: false,
            detail: "the probe vCPU could not be stopped at the time limit".into(),
        };
    };
    let (syscall_works, s) = describe("syscall", sys, USER_SYSCALL_INSN, SYSCALL_ENTRY, "LSTAR");
    let (int80_works, i) = describe(
        "int $0x80",
        i80,
        USER_INT80_INSN,
        INT80_ENTRY,
        "the int $0x80 handler",
    );
    UserSpaceProbe {
        reached_user_mode: sys.reached_user && i80.reached_user,
        syscall_works: syscall_works && sys.reached_user,
        int80_works: int80_works && i80.reached_user,
        detail: format!("{s}; {i}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::guest::{KERNEL_CS, USER_CS};
    use super::*;

    fn phase(entered_with_cs: Option<u16>, outcome: Outcome) -> Phase {
        Phase {
            reached_user: true,
            entered_with_cs: entered_with_cs.map(u32::from),
            outcome,
        }
    }

    fn exception(vector: u8, error: u32, rip: u64, cr2: u64) -> Outcome {
        Outcome::Exception {
            vector,
            error,
            rip,
            saved_cs: u32::from(USER_CS),
            cr2,
        }
    }

    #[test]
    fn details_read_well() {
        // What Linux saw on kvm_pvm.
        let p = summarize(&[
            phase(None, exception(14, 0xf, SYSCALL_ENTRY, SYSCALL_ENTRY)),
            phase(None, exception(6, 0, USER_INT80_INSN, 0)),
        ]);
        assert!(p.reached_user_mode && !p.syscall_works && !p.int80_works);
        assert_eq!(
            p.detail,
            "syscall: #PF at LSTAR from CPL 3, error 0xf, CR2 0x8080; \
             int $0x80: #UD at the int $0x80 instruction from CPL 3"
        );
        // What this probe sees on kvm_pvm.
        let p = summarize(&[
            phase(Some(0x33), exception(13, 0, PRIVILEGE_CHECK, 0)),
            phase(None, exception(6, 0, USER_INT80_INSN, 0)),
        ]);
        assert!(p.reached_user_mode && !p.syscall_works && !p.int80_works);
        assert_eq!(
            p.detail,
            "syscall: entered LSTAR in CPL 3 (CS 0x33, not the GDT's user CS 0x2b), then #GP \
             at its mov from CR0 from CPL 3, error 0x0; \
             int $0x80: #UD at the int $0x80 instruction from CPL 3"
        );
        // Ordinary KVM.
        let ok = || phase(Some(KERNEL_CS), Outcome::Privileged { cr0: 0x8001_0031 });
        let p = summarize(&[ok(), ok()]);
        assert!(p.syscall_works && p.int80_works);
        assert_eq!(
            p.detail,
            "syscall: reached ring 0 (CS 0x8); int $0x80: reached ring 0 (CS 0x8)"
        );
    }
}
