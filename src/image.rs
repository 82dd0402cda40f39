//! Pixels ⇄ tensors: decoding uploads (PNG, JPEG, with EXIF orientation), the working
//! resolution of ALGORITHM.md §1.2, and PNG encoding of results.

use burn::tensor::{Device, Tensor, TensorData};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage, imageops::FilterType};

use crate::error::{Error, Result};

/// Images above this many pixels are refused before decoding: a 100 MP photo already needs
/// 300 MB as RGB, and nothing larger is a sensible input for a 512 px editor.
pub const MAX_INPUT_PIXELS: u64 = 100_000_000;

/// Decodes an uploaded file, applying its EXIF orientation.
pub fn decode(bytes: &[u8]) -> Result<RgbImage> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image(format!("cannot read the file: {e}")))?;
    if reader.format().is_none() {
        return Err(Error::Image(
            "this file is not a PNG or JPEG image; open a photo in one of those formats".into(),
        ));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| Error::Image(format!("cannot decode the image: {e}")))?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > MAX_INPUT_PIXELS {
        return Err(Error::Image(format!(
            "the image is {w}x{h}, over the {} megapixel limit; scale it down first",
            MAX_INPUT_PIXELS / 1_000_000
        )));
    }
    let orientation = decoder.orientation().ok();
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| Error::Image(format!("cannot decode the image: {e}")))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(img.to_rgb8())
}

/// The working size for an input of `w0 x h0`: area about `r²`, sides rounded to multiples of
/// 64 (ALGORITHM.md §1.2). Small images are scaled up too.
pub fn working_size(w0: u32, h0: u32, r: u32) -> (u32, u32) {
    let k = (f64::from(r) * f64::from(r) / (f64::from(w0) * f64::from(h0))).sqrt();
    let round64 = |x: f64| (((x / 64.0).round() as u32).max(1)) * 64;
    (round64(f64::from(w0) * k), round64(f64::from(h0) * k))
}

/// Resizes to the working size (Lanczos, as the reference's OpenCV Lanczos-4).
pub fn to_working_resolution(img: &RgbImage, r: u32) -> RgbImage {
    let (w, h) = working_size(img.width(), img.height(), r);
    if (w, h) == img.dimensions() {
        return img.clone();
    }
    image::imageops::resize(img, w, h, FilterType::Lanczos3)
}

/// RGB pixels → `[1, 3, H, W]` in [-1, 1]: `(x / 255 − 0.5) · 2`.
pub fn tensor_from_image(img: &RgbImage, device: &Device) -> Tensor<4> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut values = vec![0f32; 3 * h * w];
    for (x, y, px) in img.enumerate_pixels() {
        for c in 0..3 {
            values[c * h * w + y as usize * w + x as usize] =
                (f32::from(px[c]) / 255.0 - 0.5) * 2.0;
        }
    }
    Tensor::from_data(TensorData::new(values, [1, 3, h, w]), device)
}

/// `[3, H, W]` values in [0, 1] (row-major, as read back from a `[1, 3, H, W]` tensor) → RGB,
/// rounding `x · 255` half to even as numpy does.
pub fn image_from_values(values: &[f32], h: usize, w: usize) -> Result<RgbImage> {
    if values.len() != 3 * h * w {
        return Err(Error::InvalidInput(format!(
            "expected {} values for a {w}x{h} RGB image, got {}",
            3 * h * w,
            values.len()
        )));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::InvalidInput(
            "the decoded image contains NaN or infinite values".into(),
        ));
    }
    let mut img = RgbImage::new(w as u32, h as u32);
    for (x, y, px) in img.enumerate_pixels_mut() {
        for c in 0..3 {
            let v = values[c * h * w + y as usize * w + x as usize];
            px[c] = (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8;
        }
    }
    Ok(img)
}

/// `img` resized to `w x h` (the edit result back at the photo's own size); unchanged when it
/// already has that size.
pub fn resized(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if img.dimensions() == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, w, h, FilterType::Lanczos3)
    }
}

/// SD 1.x latent channels → RGB, the linear fit to the VAE decoder that UIs use for previews
/// (ComfyUI's `latent_rgb_factors` for SD 1.5): rows are latent channels, columns R, G, B.
const LATENT_RGB: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// A cheap preview of a scaled latent `[4, h, w]` (row-major) as an `h x w` RGB image: no VAE
/// pass, so it costs almost nothing between steps. Only meaningful for SD 1.x weights.
pub fn latent_preview(values: &[f32], h: usize, w: usize) -> Result<RgbImage> {
    if values.len() != 4 * h * w {
        return Err(Error::InvalidInput(format!(
            "expected {} values for a 4x{h}x{w} latent, got {}",
            4 * h * w,
            values.len()
        )));
    }
    let mut img = RgbImage::new(w as u32, h as u32);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let at = y as usize * w + x as usize;
        for c in 0..3 {
            let v: f32 = (0..4)
                .map(|k| values[k * h * w + at] * LATENT_RGB[k][c])
                .sum();
            let v = if v.is_finite() { (v + 1.0) / 2.0 } else { 0.0 };
            px[c] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    Ok(img)
}

/// PNG bytes of an image.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| Error::Image(format!("cannot encode PNG: {e}")))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_size_keeps_area_and_multiples_of_64() {
        assert_eq!(working_size(512, 512, 512), (512, 512));
        assert_eq!(working_size(128, 128, 512), (512, 512));
        // 4:3 photo at R = 512: k = sqrt(512² / (4000·3000)) → 591 x 443 → 576 x 448.
        assert_eq!(working_size(4000, 3000, 512), (576, 448));
        assert_eq!(working_size(3000, 4000, 768), (640, 896));
    }

    #[test]
    fn latent_preview_mixes_channels_per_pixel() {
        // 2x3 latent: pixel (x=2, y=1) has channel 1 = 1, channel 3 = 0.5; all else 0.
        let (h, w) = (2, 3);
        let mut values = vec![0f32; 4 * h * w];
        values[h * w + w + 2] = 1.0;
        values[3 * h * w + w + 2] = 0.5;
        let img = latent_preview(&values, h, w).unwrap();
        let expect = |c: usize| {
            let v = LATENT_RGB[1][c] + 0.5 * LATENT_RGB[3][c];
            (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8
        };
        assert_eq!(img.get_pixel(2, 1).0, [expect(0), expect(1), expect(2)]);
        // A zero latent is mid-grey everywhere else.
        assert_eq!(img.get_pixel(0, 0).0, [128, 128, 128]);
        assert!(latent_preview(&values[1..], h, w).is_err());
    }

    #[test]
    fn rejects_files_that_are_not_images() {
        let err = decode(b"definitely not an image").unwrap_err().to_string();
        assert!(err.contains("not a PNG or JPEG"), "{err}");
    }

    #[test]
    fn png_round_trip_through_values() {
        let mut img = RgbImage::new(3, 2);
        for (i, px) in img.pixels_mut().enumerate() {
            *px = image::Rgb([i as u8 * 40, 255 - i as u8, 7]);
        }
        let png = encode_png(&img).unwrap();
        let back = decode(&png).unwrap();
        assert_eq!(back, img);
        let mut values = vec![0f32; 18];
        for (x, y, px) in img.enumerate_pixels() {
            for c in 0..3 {
                values[c * 6 + y as usize * 3 + x as usize] = f32::from(px[c]) / 255.0;
            }
        }
        assert_eq!(image_from_values(&values, 2, 3).unwrap(), img);
        values[0] = f32::NAN;
        assert!(image_from_values(&values, 2, 3).is_err());
    }
}
