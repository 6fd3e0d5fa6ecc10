//! Geo math on the WGS84 sphere approximation used by refinement and learning.

/// Mean Earth radius (IUGG), metres.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Great-circle distance between two points in degrees, metres (haversine).
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (phi1, phi2) = (lat1.to_radians(), lat2.to_radians());
    let d_phi = (lat2 - lat1).to_radians();
    let d_lambda = (lon2 - lon1).to_radians();
    let a = (d_phi / 2.0).sin().powi(2) + phi1.cos() * phi2.cos() * (d_lambda / 2.0).sin().powi(2);
    // Clamp: rounding can push `a` a hair above 1 for antipodal points.
    2.0 * EARTH_RADIUS_M * a.clamp(0.0, 1.0).sqrt().asin()
}

/// Speed in km/h for `distance_m` covered in `dt_ms`; infinite for a zero gap with movement.
pub fn speed_kmh(distance_m: f64, dt_ms: i64) -> f64 {
    if dt_ms <= 0 {
        return if distance_m > 0.0 { f64::INFINITY } else { 0.0 };
    }
    distance_m / (dt_ms as f64 / 1000.0) * 3.6
}

/// True when `lat`/`lon` are finite and within ±90 / ±180.
pub fn valid_coordinates(lat: f64, lon: f64) -> bool {
    check_coordinates(lat, lon).is_ok()
}

/// `lat`/`lon` finite and within ±90 / ±180, or the field (`lat`, `lon`) and the rule broken.
pub fn check_coordinates(lat: f64, lon: f64) -> Result<(), (&'static str, String)> {
    if !lat.is_finite() || !(-90.0..=90.0).contains(&lat) {
        return Err(("lat", format!("{lat} is outside -90..=90")));
    }
    if !lon.is_finite() || !(-180.0..=180.0).contains(&lon) {
        return Err(("lon", format!("{lon} is outside -180..=180")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_distances() {
        // One degree of latitude is ~111.2 km on this sphere.
        let d = haversine_m(0.0, 0.0, 1.0, 0.0);
        assert!((d - 111_195.08).abs() < 0.1, "{d}");
        // Paris → London, ~343.5 km.
        let d = haversine_m(48.8566, 2.3522, 51.5074, -0.1278);
        assert!((d - 343_500.0).abs() < 1_000.0, "{d}");
    }

    #[test]
    fn antimeridian_is_short() {
        let d = haversine_m(0.0, 179.9, 0.0, -179.9);
        assert!((d - 22_239.0).abs() < 1.0, "{d}");
    }

    #[test]
    fn poles_and_antipodes() {
        // All meridians meet at the pole.
        assert!(haversine_m(90.0, 0.0, 90.0, 120.0) < 1e-6);
        let half = std::f64::consts::PI * EARTH_RADIUS_M;
        assert!((haversine_m(0.0, 0.0, 0.0, 180.0) - half).abs() < 1e-3);
        assert!((haversine_m(90.0, 0.0, -90.0, 0.0) - half).abs() < 1e-3);
    }

    #[test]
    fn speed_units() {
        assert_eq!(speed_kmh(1000.0, 3_600_000), 1.0);
        assert_eq!(speed_kmh(0.0, 0), 0.0);
        assert!(speed_kmh(1.0, 0).is_infinite());
    }

    #[test]
    fn coordinate_bounds() {
        assert!(valid_coordinates(90.0, -180.0));
        assert!(!valid_coordinates(90.0001, 0.0));
        assert!(!valid_coordinates(0.0, 180.0001));
        assert!(!valid_coordinates(f64::NAN, 0.0));
        assert!(!valid_coordinates(0.0, f64::INFINITY));
    }

    proptest! {
        #[test]
        fn symmetric_and_bounded(
            lat1 in -90.0..=90.0f64, lon1 in -180.0..=180.0f64,
            lat2 in -90.0..=90.0f64, lon2 in -180.0..=180.0f64,
        ) {
            let d = haversine_m(lat1, lon1, lat2, lon2);
            prop_assert!(d >= 0.0);
            prop_assert!(d <= std::f64::consts::PI * EARTH_RADIUS_M + 1e-6);
            prop_assert!((d - haversine_m(lat2, lon2, lat1, lon1)).abs() < 1e-6);
        }

        #[test]
        fn triangle_inequality(
            a in (-90.0..=90.0f64, -180.0..=180.0f64),
            b in (-90.0..=90.0f64, -180.0..=180.0f64),
            c in (-90.0..=90.0f64, -180.0..=180.0f64),
        ) {
            let ab = haversine_m(a.0, a.1, b.0, b.1);
            let bc = haversine_m(b.0, b.1, c.0, c.1);
            let ac = haversine_m(a.0, a.1, c.0, c.1);
            prop_assert!(ac <= ab + bc + 1e-3);
        }
    }
}
