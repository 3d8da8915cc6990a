//! Bounded reads of regular files.
//!
//! Every file the daemon reads (config, manifest, model, frames, list files) goes through
//! [`read_regular`]: opened non-blocking, checked to be a regular file, and read only up to a
//! cap. A FIFO put where a frame or a manifest should be would otherwise block the reading
//! thread for good (and SIGTERM with it), and `/dev/zero` would be read until memory runs out.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Cap for text files a person writes: the daemon's config, a manifest, a signature, a list.
pub const TEXT_CAP: u64 = 16 << 20;
/// Cap for one frame file (a 4K PNG is ~25 MiB).
pub const FRAME_CAP: u64 = 64 << 20;
/// Cap for an ONNX model file (the shipped ones are 4-16 MiB).
pub const MODEL_CAP: u64 = 1 << 30;

/// What a file that is not regular is (`None` for a regular file), for the messages that
/// refuse it; the store's bundle checks use it too.
pub fn kind_of(t: std::fs::FileType) -> Option<&'static str> {
    if t.is_file() {
        None
    } else if t.is_symlink() {
        Some("symlink")
    } else if t.is_fifo() {
        Some("FIFO")
    } else if t.is_socket() {
        Some("socket")
    } else if t.is_dir() {
        Some("folder")
    } else if t.is_char_device() || t.is_block_device() {
        Some("device")
    } else {
        Some("special file")
    }
}

/// Opens `path` for reading without blocking and refuses anything but a regular file (links
/// are followed: the store's `current` link is one). The error says what the path is; callers
/// name the path.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if let Some(kind) = kind_of(f.metadata()?.file_type()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is a {kind}, not a regular file"),
        ));
    }
    Ok(f)
}

/// Reads a whole regular file of at most `cap` bytes (see the module docs).
pub fn read_regular(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    let f = open_regular(path)?;
    let len = f.metadata()?.len();
    let too_big = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "larger than {} MiB, the limit for this kind of file",
                cap >> 20
            ),
        )
    };
    if len > cap {
        return Err(too_big());
    }
    let mut out = Vec::with_capacity(len as usize);
    // A file that grows while it is read is still cut at the cap.
    f.take(cap + 1).read_to_end(&mut out)?;
    if out.len() as u64 > cap {
        return Err(too_big());
    }
    Ok(out)
}

/// [`read_regular`] for UTF-8 text.
pub fn read_text(path: &Path, cap: u64) -> io::Result<String> {
    String::from_utf8(read_regular(path, cap)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// `(line N)` for a byte offset in `text`, 1-based, for parser messages.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A TOML error as one line: the parser's message, the key it is about when the message
/// does not name it (`duplicate key`), and the line.
pub fn toml_message(e: &toml::de::Error, text: &str) -> String {
    let mut msg = e.message().trim_end().to_string();
    if let Some(s) = e.span() {
        let token = text.get(s.clone()).unwrap_or("").trim();
        if msg.contains("duplicate key") && !token.is_empty() && !msg.contains(token) {
            msg = format!("{msg} `{token}`");
        }
        msg = format!("{msg} (line {})", line_of(text, s.start));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("frame.jpg");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        // A blocking open of a FIFO with no writer would hang here.
        let e = read_regular(&p, TEXT_CAP).unwrap_err().to_string();
        assert!(e.contains("a FIFO"), "{e}");
    }

    #[test]
    fn devices_and_folders_are_refused() {
        let e = read_regular(Path::new("/dev/zero"), FRAME_CAP).unwrap_err();
        assert!(e.to_string().contains("a device"), "{e}");
        let e = read_regular(Path::new("/"), FRAME_CAP).unwrap_err();
        assert!(e.to_string().contains("a folder"), "{e}");
    }

    #[test]
    fn reads_are_capped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big.toml");
        std::fs::write(&p, vec![b'#'; (1 << 20) + 1]).unwrap();
        let e = read_regular(&p, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("larger than 1 MiB"), "{e}");
        assert_eq!(read_regular(&p, 2 << 20).unwrap().len(), (1 << 20) + 1);
    }

    #[test]
    fn lines_count_from_one_at_a_line_start() {
        let t = "a = 1\nb = 2\n";
        assert_eq!(line_of(t, 0), 1);
        assert_eq!(line_of(t, 6), 2); // `b` starts line 2
        assert_eq!(line_of(t, 5), 1); // the newline ends line 1
    }

    #[test]
    fn duplicate_keys_are_named_with_their_line() {
        let t = "[a]\nx = 1\nx = 2\n";
        let e = toml::from_str::<toml::Table>(t).unwrap_err();
        let m = toml_message(&e, t);
        assert!(m.contains("`x`") && m.contains("(line 3)"), "{m}");
    }
}
