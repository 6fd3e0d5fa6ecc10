//! GPX 1.1 output, written as it goes: waypoints first, then tracks whose points arrive one
//! at a time, so a long history never sits in memory (child order as the GPX schema wants).

use std::io::Write;

use trackmesh_proto::v1::RefinedFix;

use crate::time::format_ms;

/// Text and attribute values escaped for XML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab and newlines are not allowed in XML 1.0.
            c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A waypoint: a position with a time, name, description and type.
pub struct Waypoint<'a> {
    pub lat: f64,
    pub lon: f64,
    pub time_ms: Option<i64>,
    pub name: &'a str,
    pub desc: &'a str,
    pub kind: &'a str,
}

pub struct GpxWriter<W: Write> {
    out: W,
    in_track: bool,
    tracks: usize,
}

impl<W: Write> GpxWriter<W> {
    pub fn new(mut out: W, name: &str) -> std::io::Result<Self> {
        writeln!(out, r#"<?xml version="1.0" encoding="UTF-8"?>"#)?;
        writeln!(
            out,
            r#"<gpx version="1.1" creator="trackctl" xmlns="http://www.topografix.com/GPX/1/1">"#
        )?;
        writeln!(out, "  <metadata><name>{}</name></metadata>", escape(name))?;
        Ok(Self {
            out,
            in_track: false,
            tracks: 0,
        })
    }

    /// A `<wpt>`; all of them come before the first track.
    pub fn waypoint(&mut self, point: &Waypoint<'_>) -> std::io::Result<()> {
        write!(
            self.out,
            r#"  <wpt lat="{:.7}" lon="{:.7}">"#,
            point.lat, point.lon
        )?;
        if let Some(time_ms) = point.time_ms {
            write!(self.out, "<time>{}</time>", format_ms(time_ms))?;
        }
        writeln!(
            self.out,
            "<name>{}</name><desc>{}</desc><type>{}</type></wpt>",
            escape(point.name),
            escape(point.desc),
            escape(point.kind)
        )
    }

    /// Opens a `<trk>` of one segment; its points follow with [`Self::point`].
    pub fn start_track(&mut self, name: &str, desc: &str, kind: &str) -> std::io::Result<()> {
        self.end_track()?;
        writeln!(
            self.out,
            "  <trk><name>{}</name><desc>{}</desc><type>{}</type><trkseg>",
            escape(name),
            escape(desc),
            escape(kind)
        )?;
        self.in_track = true;
        self.tracks += 1;
        Ok(())
    }

    pub fn point(&mut self, refined: &RefinedFix) -> std::io::Result<()> {
        let Some(fix) = &refined.fix else {
            return Ok(());
        };
        write!(
            self.out,
            r#"    <trkpt lat="{:.7}" lon="{:.7}">"#,
            fix.lat, fix.lon
        )?;
        if let Some(altitude) = fix.altitude_m {
            write!(self.out, "<ele>{altitude}</ele>")?;
        }
        writeln!(self.out, "<time>{}</time></trkpt>", format_ms(fix.time_ms))
    }

    fn end_track(&mut self) -> std::io::Result<()> {
        if self.in_track {
            writeln!(self.out, "  </trkseg></trk>")?;
            self.in_track = false;
        }
        Ok(())
    }

    /// Closes the document; returns the writer and the number of tracks.
    pub fn finish(mut self) -> std::io::Result<(W, usize)> {
        self.end_track()?;
        writeln!(self.out, "</gpx>")?;
        self.out.flush()?;
        Ok((self.out, self.tracks))
    }
}

#[cfg(test)]
mod tests {
    use trackmesh_proto::v1::Fix;

    use super::*;

    #[test]
    fn escapes_what_xml_reserves() {
        assert_eq!(escape(r#"a<b>&"c'"#), "a&lt;b&gt;&amp;&quot;c&apos;");
        assert_eq!(escape("x\u{1}y"), "x\u{fffd}y");
    }

    #[test]
    fn waypoints_then_tracks() {
        let mut gpx = GpxWriter::new(Vec::new(), "v1 <trips>").unwrap();
        gpx.waypoint(&Waypoint {
            lat: 40.5,
            lon: -74.25,
            time_ms: Some(1_000),
            name: "p1",
            desc: "home & dry",
            kind: "stay",
        })
        .unwrap();
        gpx.start_track("trip 1", "", "trip").unwrap();
        gpx.point(&RefinedFix {
            fix: Some(Fix {
                time_ms: 2_000,
                lat: 40.5,
                lon: -74.0,
                altitude_m: Some(3.5),
                ..Fix::default()
            }),
            ..RefinedFix::default()
        })
        .unwrap();
        gpx.start_track("trip 2", "", "trip").unwrap();
        let (bytes, tracks) = gpx.finish().unwrap();
        assert_eq!(tracks, 2);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("<name>v1 &lt;trips&gt;</name>"), "{text}");
        assert!(text.contains(r#"<wpt lat="40.5000000" lon="-74.2500000"><time>1970-01-01T00:00:01Z</time><name>p1</name><desc>home &amp; dry</desc>"#), "{text}");
        assert!(text.contains(r#"<trkpt lat="40.5000000" lon="-74.0000000"><ele>3.5</ele><time>1970-01-01T00:00:02Z</time></trkpt>"#), "{text}");
        assert_eq!(text.matches("<trk>").count(), 2);
        assert_eq!(text.matches("</trk>").count(), 2);
        assert!(text.ends_with("</gpx>\n"));
    }
}
