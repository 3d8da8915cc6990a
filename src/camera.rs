//! V4L2 camera source (crate `v4l`, mmap streaming) that survives unplugging and stalls.
//!
//! The source never ends: while the device is missing it returns [`CaptureError::Waiting`]
//! every few hundred milliseconds (so the capture thread can still be stopped), retries with
//! backoff, and logs once per change of state rather than once per attempt.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use image::RgbImage;
use v4l::buffer::Type;
use v4l::io::traits::CaptureStream;
use v4l::prelude::*;
use v4l::video::Capture;

use crate::capture::{CaptureError, Frame, FrameSource};
use crate::pixfmt::{self, PixelFormat};

/// What the camera is asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraConfig {
    /// Device node, best a stable `/dev/v4l/by-id/...` link.
    pub device: PathBuf,
    /// Pixel format; `None` takes the first of [`PixelFormat::ALL`] the device offers.
    pub format: Option<PixelFormat>,
    /// Requested width.
    pub width: u32,
    /// Requested height.
    pub height: u32,
    /// Requested frame rate.
    pub fps: u32,
    /// A device that stays open but delivers nothing this long is reopened.
    pub stall: Duration,
}

/// Linux's ENODEV, the same on every architecture.
const ENODEV: i32 = 19;
const POLL: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Capture buffers the driver fills while this thread converts and preprocesses.
const BUFFERS: u32 = 4;

struct Open {
    // The stream holds its own handle to the device; `dev` is kept for clarity of ownership.
    _dev: Device,
    stream: MmapStream<'static>,
    format: PixelFormat,
    width: u32,
    height: u32,
    stride: usize,
    last_frame: Instant,
    /// The last dequeue timed out: the buffer `next` would give back first is still queued.
    timed_out: bool,
}

/// What the source last reported, so each state is logged once.
#[derive(Debug, Clone, PartialEq)]
enum Reported {
    Nothing,
    Streaming,
    Down(String),
}

/// A V4L2 capture device.
pub struct Camera {
    cfg: CameraConfig,
    open: Option<Open>,
    next_try: Instant,
    backoff: Duration,
    reported: Reported,
    seq: u64,
    start: Instant,
    rgb: RgbImage,
}

impl Camera {
    /// Creates the source; the device is opened on the first frame request (and reopened
    /// whenever it goes away), so a camera plugged in after start is picked up.
    pub fn new(cfg: CameraConfig) -> Self {
        Camera {
            cfg,
            open: None,
            next_try: Instant::now(),
            backoff: BACKOFF_MIN,
            reported: Reported::Nothing,
            seq: 0,
            start: Instant::now(),
            rgb: RgbImage::new(0, 0),
        }
    }

    fn device_name(&self) -> String {
        self.cfg.device.display().to_string()
    }

    /// Logs a change of state; returns whether it logged. Down is one state whatever its
    /// reason: an unplugged camera first fails with ENODEV, then its node is gone, and that
    /// is one event, not two (a changed reason is logged at debug level).
    fn report(&mut self, state: Reported) -> bool {
        if self.reported == state {
            return false;
        }
        if let (Reported::Down(_), Reported::Down(why)) = (&self.reported, &state) {
            log::debug!("camera {}: still down: {why}", self.device_name());
            self.reported = state;
            return false;
        }
        let dev = self.device_name();
        match &state {
            Reported::Streaming => {}
            Reported::Down(why) => log::error!(
                "camera {dev}: {why}; retrying every {:.1}-{:.0} s until it is back",
                BACKOFF_MIN.as_secs_f64(),
                BACKOFF_MAX.as_secs_f64()
            ),
            Reported::Nothing => {}
        }
        self.reported = state;
        true
    }

    fn try_open(&self) -> Result<Open, String> {
        let path = &self.cfg.device;
        let dev = Device::with_path(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                "no such device: check the cable, or [source] device (ls /dev/v4l/by-id)".into()
            }
            io::ErrorKind::PermissionDenied => {
                "permission denied: the service user must be in the video group".into()
            }
            _ => format!("cannot open: {e}"),
        })?;
        let caps = dev
            .query_caps()
            .map_err(|e| format!("not a V4L2 device ({e})"))?;
        use v4l::capability::Flags;
        if !caps
            .capabilities
            .contains(Flags::VIDEO_CAPTURE | Flags::STREAMING)
        {
            return Err(format!(
                "{} ({}) is not a streaming capture device: pick the capture node in /dev/v4l/by-id",
                caps.card, caps.driver
            ));
        }
        let wanted: Vec<PixelFormat> = match self.cfg.format {
            Some(f) => vec![f],
            None => PixelFormat::ALL.to_vec(),
        };
        let mut got = None;
        for want in &wanted {
            let fmt = requested_format(*want, self.cfg.width, self.cfg.height);
            let set = dev
                .set_format(&fmt)
                .map_err(|e| format!("cannot set format {want}: {e}"))?;
            if set.fourcc.repr == want.fourcc() {
                got = Some((*want, set));
                break;
            }
        }
        let Some((format, set)) = got else {
            return Err(format!(
                "offers none of the formats asked for ({}): set [source] format to one it lists \
                 in `v4l2-ctl --list-formats-ext -d {}`",
                wanted
                    .iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                path.display()
            ));
        };
        let params = dev
            .set_params(&v4l::video::capture::Parameters::with_fps(self.cfg.fps))
            .map_err(|e| format!("cannot set frame rate: {e}"))?;
        let fps = params.interval.denominator as f64 / params.interval.numerator.max(1) as f64;
        let mut stream = MmapStream::with_buffers(&dev, Type::VideoCapture, BUFFERS)
            .map_err(|e| format!("cannot map buffers: {e}"))?;
        stream.set_timeout(POLL);
        log::info!(
            "camera {}: {} ({}), {format} {}x{} stride {} at {fps:.1} fps (asked {}x{} at {})",
            path.display(),
            caps.card,
            caps.driver,
            set.width,
            set.height,
            set.stride,
            self.cfg.width,
            self.cfg.height,
            self.cfg.fps
        );
        Ok(Open {
            _dev: dev,
            stream,
            format,
            width: set.width,
            height: set.height,
            stride: set.stride as usize,
            last_frame: Instant::now(),
            timed_out: false,
        })
    }

    fn lost(&mut self, why: String) {
        self.open = None;
        self.next_try = Instant::now() + self.backoff;
        let _ = self.report(Reported::Down(why));
    }
}

/// The format asked of the device: a fresh request, not the device's current format with the
/// size and code changed. Stride and image size 0 let the driver compute them for the new
/// format; carried over from the previous one (a larger RGB24 stride, say), a driver that
/// honours padded strides (vivid does) keeps it, and the frames come with the old format's
/// line length. Progressive only: the converters know no interlaced field orders.
fn requested_format(format: PixelFormat, width: u32, height: u32) -> v4l::Format {
    let mut f = v4l::Format::new(width, height, v4l::FourCC::new(&format.fourcc()));
    f.field_order = v4l::format::FieldOrder::Progressive;
    f
}

impl FrameSource for Camera {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        if self.open.is_none() {
            let now = Instant::now();
            if now < self.next_try {
                std::thread::sleep((self.next_try - now).min(POLL));
                return Err(CaptureError::Waiting);
            }
            match self.try_open() {
                Ok(o) => {
                    if matches!(self.reported, Reported::Down(_)) {
                        log::info!("camera {}: back", self.device_name());
                    }
                    self.open = Some(o);
                    self.backoff = BACKOFF_MIN;
                    let _ = self.report(Reported::Streaming);
                }
                Err(why) => {
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    self.lost(why);
                    return Err(CaptureError::Waiting);
                }
            }
        }
        let stall = self.cfg.stall;
        let o = self.open.as_mut().expect("opened above");
        // `MmapStream::next` first gives back the buffer it dequeued last. After a timeout
        // that buffer is still queued, and queueing it again fails with EINVAL: on a real
        // driver every gap longer than the poll timeout (a signal dropout, a stalled source)
        // became "capture failed: Invalid argument" and a reopen, so a stall was never seen
        // as one. After a timeout a buffer is dequeued first (its frame is skipped: `next`
        // gives it back), then streaming goes on.
        let resumed = if o.timed_out {
            CaptureStream::dequeue(&mut o.stream).map(|_| o.timed_out = false)
        } else {
            Ok(())
        };
        // When converting and preprocessing a frame takes longer than the camera's frame time,
        // the driver's queue fills and the oldest frame would come next, up to BUFFERS frames
        // late; the alert then follows the polyp by that much. Frames already waiting behind
        // the one dequeued are stale: skip to the newest (a gap in `seq`, as the source's own
        // drops are).
        let handle = o.stream.handle();
        let mut skipped = 0;
        let result = resumed.and_then(|()| {
            loop {
                let (buf, meta) = o.stream.next()?;
                if skipped + 1 < BUFFERS && handle.poll(libc::POLLIN, 0)? > 0 {
                    skipped += 1;
                    continue;
                }
                let captured = Instant::now();
                let used = (meta.bytesused as usize).min(buf.len());
                let r = pixfmt::convert(
                    o.format,
                    &buf[..used],
                    o.width,
                    o.height,
                    o.stride,
                    &mut self.rgb,
                );
                break Ok((r, captured));
            }
        });
        match result {
            Ok((converted, captured)) => {
                o.last_frame = Instant::now();
                self.seq += u64::from(skipped);
                let seq = self.seq;
                self.seq += 1;
                converted.map_err(|source| CaptureError::BadBuffer { seq, error: source })?;
                Ok(Some(Frame {
                    seq,
                    captured,
                    decode_ms: captured.elapsed().as_secs_f64() * 1e3,
                    t_ms: (captured - self.start).as_millis() as u64,
                    origin: format!("{}#{seq}", self.cfg.device.display()),
                    image: self.rgb.clone(),
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                o.timed_out = true;
                if o.last_frame.elapsed() >= stall {
                    self.lost(format!(
                        "stalled, no frame for {:.1} s while open: reopening",
                        stall.as_secs_f64()
                    ));
                    // A stall is retried at once; backoff applies if reopening fails.
                    self.next_try = Instant::now();
                }
                Err(CaptureError::Waiting)
            }
            Err(e) => {
                let why = if e.raw_os_error() == Some(ENODEV) {
                    "unplugged (ENODEV)".to_string()
                } else {
                    format!("capture failed: {e}")
                };
                self.lost(why.clone());
                // At once, not after stall_secs: an alert must not outlive the video it was
                // raised on, nor carry on as the same alert when the camera comes back.
                Err(CaptureError::Lost { reason: why })
            }
        }
    }

    fn describe(&self) -> String {
        format!(
            "v4l2 {} ({}, {}x{} at {} fps)",
            self.cfg.device.display(),
            self.cfg
                .format
                .map_or("any format".into(), |f| f.to_string()),
            self.cfg.width,
            self.cfg.height,
            self.cfg.fps
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cam(device: &str) -> Camera {
        Camera::new(CameraConfig {
            device: device.into(),
            format: Some(PixelFormat::Yuyv),
            width: 640,
            height: 480,
            fps: 30,
            stall: Duration::from_secs(2),
        })
    }

    #[test]
    fn a_missing_device_waits_and_backs_off_without_ending() {
        let mut c = cam("/dev/v4l/by-id/polypwatch-test-missing");
        let t = Instant::now();
        for _ in 0..3 {
            assert!(matches!(c.next_frame(), Err(CaptureError::Waiting)));
        }
        // Retries are paced: three calls do not spin.
        assert!(t.elapsed() >= Duration::from_millis(400));
        assert!(c.backoff > BACKOFF_MIN);
        match &c.reported {
            Reported::Down(why) => assert!(why.contains("no such device"), "{why}"),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_device_that_goes_away_is_logged_once_whatever_the_next_error() {
        let mut c = cam("/dev/v4l/by-id/polypwatch-test-missing");
        assert!(c.report(Reported::Streaming));
        assert!(c.report(Reported::Down("unplugged (ENODEV)".into())));
        assert!(!c.report(Reported::Down("no such device".into())));
        assert!(!c.report(Reported::Down("permission denied".into())));
        assert!(c.report(Reported::Streaming));
        assert!(c.report(Reported::Down("unplugged (ENODEV)".into())));
    }

    #[test]
    fn a_format_request_leaves_stride_and_size_to_the_driver() {
        let f = requested_format(PixelFormat::Nv12, 1280, 1024);
        assert_eq!((f.width, f.height), (1280, 1024));
        assert_eq!(f.fourcc.repr, *b"NV12");
        assert_eq!((f.stride, f.size), (0, 0));
        assert!(matches!(
            f.field_order,
            v4l::format::FieldOrder::Progressive
        ));
    }

    #[test]
    fn a_file_that_is_not_a_camera_is_named() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let c = cam(f.path().to_str().unwrap());
        let why = c.try_open().err().unwrap();
        assert!(why.contains("not a V4L2 device"), "{why}");
    }
}
