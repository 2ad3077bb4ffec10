//! The lab commands (`demo`, `fault-suite`, `bench`) live in the `orderflow-lab` binary, which the
//! production image leaves out (it links the simulators and the transformer). `orderflow` keeps
//! them as thin entries: it runs `orderflow-lab` with its own arguments, found beside this
//! executable or on `PATH`, and exits as it does.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::ExitCode,
};

/// The lab binary's name.
pub const LAB: &str = "orderflow-lab";

/// Where `orderflow-lab` is: in `exe_dir` (this executable's directory), else the first one on
/// `path` (a `PATH` value).
pub fn find(exe_dir: Option<&Path>, path: Option<&OsStr>) -> Option<PathBuf> {
    let beside = exe_dir.map(|dir| dir.join(LAB)).filter(|p| runnable(p));
    beside.or_else(|| std::env::split_paths(path?).map(|dir| dir.join(LAB)).find(|p| runnable(p)))
}

fn runnable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

/// What `orderflow <command>` says when there is no `orderflow-lab` to run.
pub fn missing(command: &str, exe_dir: Option<&Path>) -> String {
    let beside =
        exe_dir.map(|d| format!("beside orderflow in {}", d.display())).unwrap_or_else(|| "beside orderflow".into());
    format!(
        "`orderflow {command}` is a lab command: it runs {LAB}, which is neither {beside} nor on PATH. \
         Build it with the workspace (`cargo build --release` builds every binary, {LAB} included). \
         The production image leaves the lab out; the simulators' image (`docker build --target sims .`) has it."
    )
}

/// Runs `orderflow-lab` with this process's arguments (`orderflow [flags] demo …` becomes
/// `orderflow-lab [flags] demo …`). On Unix the process becomes `orderflow-lab` (its exit code,
/// its signals, its children); this returns only when it could not be started.
pub fn run(command: &str) -> ExitCode {
    let exe_dir = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf));
    let Some(lab) = find(exe_dir.as_deref(), std::env::var_os("PATH").as_deref()) else {
        eprintln!("orderflow: {}", missing(command, exe_dir.as_deref()));
        return ExitCode::from(2);
    };
    let mut cmd = std::process::Command::new(&lab);
    cmd.args(std::env::args_os().skip(1));
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let error = cmd.exec();
        eprintln!("orderflow: cannot run {}: {error}", lab.display());
        ExitCode::from(2)
    }
    #[cfg(not(unix))]
    match cmd.status() {
        Ok(status) => ExitCode::from(status.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1)),
        Err(error) => {
            eprintln!("orderflow: cannot run {}: {error}", lab.display());
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_lab(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).expect("dir");
        let lab = dir.join(LAB);
        std::fs::write(&lab, "#!/bin/sh\n").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&lab, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        lab
    }

    #[test]
    fn the_lab_beside_this_executable_wins_over_path() {
        let root = std::env::temp_dir().join(format!("orderflow-lab-find-{}", std::process::id()));
        let (beside, on_path, empty) = (root.join("bin"), root.join("path"), root.join("empty"));
        std::fs::create_dir_all(&empty).expect("dir");
        let (a, b) = (fake_lab(&beside), fake_lab(&on_path));
        let path = std::env::join_paths([&empty, &on_path]).expect("PATH");
        assert_eq!(find(Some(&beside), Some(&path)), Some(a));
        assert_eq!(find(Some(&empty), Some(&path)), Some(b));
        assert_eq!(find(Some(&empty), None), None);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_missing_lab_is_named_with_how_to_get_it() {
        let text = missing("demo", Some(Path::new("/usr/local/bin")));
        assert!(
            text.contains("orderflow-lab") && text.contains("/usr/local/bin") && text.contains("cargo build"),
            "{text}"
        );
    }
}
