//! One thread, full-size RGB decodes of every JPEG under a folder, held in memory: images/s
//! for libjpeg-turbo (turbojpeg crate), zune-jpeg and jpeg-decoder, in alternating rounds.
//!
//!     jpeg-decoders-bench DIR [ROUNDS]

use std::time::Instant;

fn jpegs(dir: &std::path::Path, out: &mut Vec<Vec<u8>>) {
    for entry in std::fs::read_dir(dir).expect("reading the folder") {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            jpegs(&path, out);
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jpeg") || e.eq_ignore_ascii_case("jpg"))
        {
            out.push(std::fs::read(&path).expect("reading a JPEG"));
        }
    }
}

/// Decodes every file with `decode` (returning the pixel bytes written), once; images/s.
fn round(files: &[Vec<u8>], mut decode: impl FnMut(&[u8]) -> usize) -> f64 {
    let started = Instant::now();
    let mut bytes = 0;
    for f in files {
        bytes += decode(f);
    }
    assert!(bytes > 0);
    files.len() as f64 / started.elapsed().as_secs_f64()
}

/// A libjpeg-turbo decode to RGB at `scale`, into a buffer it reuses.
fn libjpeg_turbo_at(scale: turbojpeg::ScalingFactor) -> impl FnMut(&[u8]) -> usize {
    let mut turbo = turbojpeg::Decompressor::new().expect("a libjpeg-turbo decompressor");
    turbo
        .set_scaling_factor(scale)
        .expect("a scale libjpeg-turbo offers");
    let mut buffer = Vec::new();
    move |f: &[u8]| {
        let header = turbo.read_header(f).expect("a JPEG header").scaled(scale);
        let len = header.width * header.height * 3;
        if buffer.len() < len {
            buffer.resize(len, 0);
        }
        let image = turbojpeg::Image {
            pixels: &mut buffer[..len],
            width: header.width,
            pitch: header.width * 3,
            height: header.height,
            format: turbojpeg::PixelFormat::RGB,
        };
        turbo.decompress(f, image).expect("a libjpeg-turbo decode");
        len
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .expect("usage: jpeg-decoders-bench DIR [ROUNDS]");
    let rounds: usize = args
        .get(2)
        .map_or(3, |r| r.parse().expect("ROUNDS is a number"));
    let mut files = Vec::new();
    jpegs(std::path::Path::new(dir), &mut files);
    let mb = files.iter().map(Vec::len).sum::<usize>() as f64 / 1e6;
    println!(
        "{} JPEGs, {mb:.1} MB, one thread, full-size RGB",
        files.len()
    );

    let mut libjpeg_turbo = libjpeg_turbo_at(turbojpeg::ScalingFactor::ONE);
    let mut seven_eighths = libjpeg_turbo_at(turbojpeg::ScalingFactor::new(7, 8));
    let mut zune_buffer = Vec::new();
    let mut zune = |f: &[u8]| {
        let options = zune_core::options::DecoderOptions::default()
            .jpeg_set_out_colorspace(zune_core::colorspace::ColorSpace::RGB);
        let mut d = zune_jpeg::JpegDecoder::new_with_options(
            zune_core::bytestream::ZCursor::new(f),
            options,
        );
        d.decode_headers().expect("a JPEG header");
        let len = d.output_buffer_size().expect("a size after the headers");
        if zune_buffer.len() < len {
            zune_buffer.resize(len, 0);
        }
        d.decode_into(&mut zune_buffer[..len])
            .expect("a zune decode");
        len
    };
    let jpeg_decoder = |f: &[u8]| {
        let mut d = jpeg_decoder::Decoder::new(std::io::Cursor::new(f));
        d.decode().expect("a jpeg-decoder decode").len()
    };
    let mut jpeg_decoder = jpeg_decoder;
    for r in 0..rounds {
        let t = round(&files, &mut libjpeg_turbo);
        let z = round(&files, &mut zune);
        let j = round(&files, &mut jpeg_decoder);
        let s = round(&files, &mut seven_eighths);
        println!(
            "round {}: libjpeg-turbo {t:.0} (at 7/8 scale: {s:.0}), zune-jpeg {z:.0}, jpeg-decoder {j:.0} images/s",
            r + 1
        );
    }
}
